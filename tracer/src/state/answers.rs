//! The state's answers about flows, in the model's wire types: `/flows` (one go), `/flows/{id}`,
//! `/diagnoses`, the census behind `/metrics`, and a flow's kept records for pcap.
use std::collections::HashMap;

use tracer_model::{
    diagnoses::{CauseGroup, EvidenceSummary},
    flow::FlowsPageWriter,
    query::{FlowQuery, Since, DEFAULT_LIMIT},
    Cause, DiagnosesAnswer, FlowEndpoints, FlowView, FlowsPage, Verdict,
};

use super::{lock, view, Census, FlowCursor, Shared};
use crate::{
    diagnose::judge,
    flows::{Flow, FlowId, Sample},
};

/// One cause's flows in a `/diagnoses` answer.
#[derive(Default)]
struct Group {
    count: u64,
    first_ns: u64,
    last_ns: u64,
    examples: Vec<u64>,
    /// Flows of the group whose records may be partial.
    incomplete: u64,
    /// The most recently active flow of the group: its diagnosis is the group's text.
    latest_ns: Option<u64>,
    latest_id: u64,
}

impl Group {
    fn add(&mut self, f: &Flow, partial: bool) {
        self.count += 1;
        if partial {
            self.incomplete += 1;
        }
        self.first_ns = if self.first_ns == 0 {
            f.first_ns
        } else {
            self.first_ns.min(f.first_ns)
        };
        self.last_ns = self.last_ns.max(f.last_ns);
        if self.examples.len() < 5 {
            self.examples.push(f.id);
        }
    }
}

/// Where [`Shared::each_shown`] puts the views it builds.
trait PageSink {
    /// At most this many flows will be shown (fewer if fewer match).
    fn expect(&mut self, at_most: usize);
    fn flow(&mut self, view: FlowView);
}

impl PageSink for Vec<FlowView> {
    fn expect(&mut self, _at_most: usize) {
        // Grown as flows come: a bound of a page is not a count, and views are large.
    }

    fn flow(&mut self, view: FlowView) {
        self.push(view);
    }
}

/// A page written as JSON as its views are built (the first error is kept, later flows are
/// skipped: the answer is then `{}` as [`FlowsPage::write_json`]'s callers make it).
struct JsonPage<'a> {
    writer: FlowsPageWriter<'a>,
    result: serde_json::Result<()>,
}

impl PageSink for JsonPage<'_> {
    fn expect(&mut self, at_most: usize) {
        // A four-hop flow is about 1.5 KB: the body is sized once, not grown by doubling
        // and copying through a thousand flows.
        self.writer.reserve(64 + at_most * 1536);
    }

    fn flow(&mut self, view: FlowView) {
        if self.result.is_ok() {
            self.result = self.writer.flow(&view);
        }
    }
}

impl Shared {
    /// The query as a predicate over flows. The pod's veth name (a sha1) and the `since`
    /// threshold are worked out once per query, not once per flow. `pod=` matches flows through
    /// the pod's veth, and with identity on also flows with an address that was the pod's.
    pub(crate) fn matcher<'q>(&self, q: &'q FlowQuery, now_ns: u64) -> impl Fn(&Flow) -> bool + 'q {
        let veth = q.pod.as_ref().map(|(ns, name)| self.pod_veth(ns, name));
        let names = self.naming();
        let since_ns = match q.since {
            Some(Since::Ago(d)) => now_ns.saturating_sub(d.as_nanos() as u64),
            Some(Since::At(t)) => self.clock.mono_of(t),
            None => 0,
        };
        move |f: &Flow| {
            matches_tuple(q, f)
                && f.last_ns >= since_ns
                && veth.as_deref().is_none_or(|v| {
                    f.hops().any(|h| *h.iface.name == *v)
                        || q.pod
                            .as_ref()
                            .is_some_and(|(ns, name)| names.is_pod(f, ns, name))
                })
                && names.matches(q, f)
        }
    }

    /// `GET /flows` answered in one go (the API streams large or judging queries through
    /// [`FlowCursor`] instead).
    pub fn flows(&self, q: &FlowQuery) -> FlowsPage {
        if q.verdict.is_some() || q.cause.is_some() {
            return self.flows_judged(q);
        }
        let mut flows = Vec::new();
        let (matched, _) = self.each_shown(q, &mut flows);
        FlowsPage {
            truncated: matched > flows.len(),
            flows,
            matched,
        }
    }

    /// [`Shared::flows`]'s page as JSON (the bytes of [`FlowsPage::write_json`]), each flow
    /// written as soon as its view is built: a view's strings are freed before the next one's
    /// are allocated, so a page reuses the same few hundred bytes of heap instead of holding a
    /// thousand views (about 1 MB of fresh memory, page faults on a first answer).
    pub fn flows_json(&self, q: &FlowQuery) -> Vec<u8> {
        let mut out = Vec::new();
        let ok = if q.verdict.is_some() || q.cause.is_some() {
            self.flows(q).write_json(&mut out)
        } else {
            let mut page = JsonPage {
                writer: FlowsPageWriter::new(&mut out),
                result: Ok(()),
            };
            let (matched, shown) = self.each_shown(q, &mut page);
            let JsonPage { writer, result } = page;
            result.map(|()| writer.finish(matched, matched > shown))
        };
        // Sized for `limit` flows before the count was known: give back what a short page
        // left over (in place for the heap's chunks), the body lives until it is sent.
        if out.capacity() > 2 * out.len() + 65536 {
            out.shrink_to_fit();
        }
        match ok {
            Ok(()) => out,
            Err(_) => b"{}".to_vec(),
        }
    }

    /// The flows a `/flows` answer without verdict or cause filter shows, newest first, each
    /// view handed to `page` as it is built; returns how many flows matched and how many were
    /// shown. Judging is the
    /// expensive part: only the flows shown are judged, the rest counted. By destination, the
    /// address index finds the flows, and counts them when nothing else is asked: then only
    /// the flows shown are read.
    fn each_shown(&self, q: &FlowQuery, page: &mut impl PageSink) -> (usize, usize) {
        let limit = q.limit.unwrap_or(DEFAULT_LIMIT);
        self.with_context(|cx, table| {
            let mut shown = 0usize;
            let mut matched = 0usize;
            let matches = self.matcher(q, cx.now_ns);
            let names = self.naming();
            let view_of = |f: &Flow| view::flow_view(f, judge(f, cx), &self.clock, cx, &names);
            page.expect(table.len().min(limit));
            if let Some(net) = q.dst.as_ref().filter(|_| only_dst(q)) {
                // Nothing but the destination asked: the index counts the matches, and only
                // the flows shown are read.
                let matched = table.visit_newest_to_counting(net, |f| {
                    page.flow(view_of(f));
                    shown += 1;
                    shown < limit
                });
                return (matched, shown);
            }
            let (src, _) = q.hosts();
            let candidates: Box<dyn Iterator<Item = &Flow>> = match (&q.dst, src) {
                (Some(net), _) => Box::new(table.iter_newest_to(net, FlowId::MAX).map(|(_, f)| f)),
                (None, Some(src)) => Box::new(table.iter_newest_from(src)),
                (None, None) => Box::new(table.iter_newest()),
            };
            for f in candidates {
                if !matches(f) {
                    continue;
                }
                matched += 1;
                if shown < limit {
                    page.flow(view_of(f));
                    shown += 1;
                }
            }
            (matched, shown)
        })
    }

    /// `/flows` with a verdict or cause filter: every candidate must be judged, a part of the
    /// table at a time (see [`FlowCursor`]).
    fn flows_judged(&self, q: &FlowQuery) -> FlowsPage {
        let mut cur = FlowCursor::new(q.clone());
        let mut flows = Vec::new();
        while !cur.done() {
            flows.extend(self.flows_chunk(&mut cur));
        }
        FlowsPage {
            truncated: cur.matched() > flows.len(),
            matched: cur.matched(),
            flows,
        }
    }

    /// Faulty flows grouped by cause, plus what the node's configuration alone shows.
    ///
    /// The groups come from the tally's judgements (brought up to date first: only flows changed
    /// or due since its last run are judged), and only each group's latest flow is judged again
    /// for its text. While the tally is behind a change to what every judgement reads (a full
    /// pass is held back for a few seconds), or a latest flow's cause moved since, every flow is
    /// judged instead, as before.
    pub fn diagnoses(&self) -> DiagnosesAnswer {
        self.tally();
        let tally = lock(&self.tally);
        if !tally.is_current(self.judgement_basis()) {
            drop(tally);
            return self.diagnoses_judging_all();
        }
        let mut groups: std::collections::BTreeMap<&'static str, (Cause, Group)> =
            Default::default();
        let mut judged = 0u64;
        let mut incomplete = 0u64;
        self.visit_chunked(|cx, f| {
            judged += 1;
            // A flow that arrived after the tally ran has no mark yet: judge it here.
            let (cause, partial) = tally.diagnosis_of(f.id).unwrap_or_else(|| {
                let j = judge(f, cx);
                (j.diagnosis.map(|d| d.cause), j.lost_records > 0)
            });
            if partial {
                incomplete += 1;
            }
            if let Some(cause) = cause {
                let (_, g) = groups
                    .entry(cause.as_str())
                    .or_insert_with(|| (cause, Group::default()));
                g.add(f, partial);
                if g.latest_ns.is_none_or(|t| f.last_ns > t) {
                    g.latest_ns = Some(f.last_ns);
                    g.latest_id = f.id;
                }
            }
            true
        });
        drop(tally);
        let names = self.naming();
        let mut latest = Vec::new();
        let stale = self.with_context(|cx, table| {
            for (cause, g) in groups.values() {
                let Some(f) = table.get(g.latest_id) else {
                    return true;
                };
                match judge(f, cx).diagnosis {
                    Some(mut d) if d.cause == *cause => {
                        d.summary = names.name_text(&d.summary, f.first_ns);
                        latest.push((d, names.endpoints(f, cx.facts)));
                    }
                    _ => return true,
                }
            }
            false
        });
        if stale {
            return self.diagnoses_judging_all();
        }
        let groups = groups
            .into_values()
            .zip(latest)
            .map(|((cause, g), (d, endpoints))| (cause, g, d, endpoints))
            .collect();
        self.diagnoses_answer(groups, judged, incomplete)
    }

    /// `/diagnoses` by judging every flow now.
    pub(super) fn diagnoses_judging_all(&self) -> DiagnosesAnswer {
        struct Judged {
            group: Group,
            latest: Option<(u64, tracer_model::Diagnosis, Option<FlowEndpoints>)>,
        }
        // Keyed by wire name: causes with equal counts are listed alphabetically.
        let mut groups: std::collections::BTreeMap<&'static str, (Cause, Judged)> =
            Default::default();
        let mut judged = 0u64;
        let mut incomplete = 0u64;
        let names = self.naming();
        self.visit_chunked(|cx, f| {
            judged += 1;
            let j = judge(f, cx);
            if j.lost_records > 0 {
                incomplete += 1;
            }
            if let Some(d) = j.diagnosis {
                let (_, g) = groups.entry(d.cause.as_str()).or_insert_with(|| {
                    (
                        d.cause,
                        Judged {
                            group: Group::default(),
                            latest: None,
                        },
                    )
                });
                g.group.add(f, j.lost_records > 0);
                if g.latest.as_ref().is_none_or(|(t, _, _)| f.last_ns > *t) {
                    let mut d = d;
                    d.summary = names.name_text(&d.summary, f.first_ns);
                    g.latest = Some((f.last_ns, d, names.endpoints(f, cx.facts)));
                }
            }
            true
        });
        let groups = groups
            .into_values()
            .filter_map(|(cause, j)| {
                let (_, d, endpoints) = j.latest?;
                Some((cause, j.group, d, endpoints))
            })
            .collect();
        self.diagnoses_answer(groups, judged, incomplete)
    }

    fn diagnoses_answer(
        &self,
        groups: Vec<(Cause, Group, tracer_model::Diagnosis, Option<FlowEndpoints>)>,
        judged: u64,
        incomplete: u64,
    ) -> DiagnosesAnswer {
        self.with_context(|cx, table| {
            let mut causes: Vec<CauseGroup> = groups
                .into_iter()
                .map(|(cause, g, d, endpoints)| CauseGroup {
                    cause,
                    count: g.count,
                    first_seen: self.clock.rfc3339(g.first_ns),
                    last_seen: self.clock.rfc3339(g.last_ns),
                    summary: d.summary,
                    evidence: d.evidence,
                    fix: d.fix,
                    example_flows: g.examples,
                    evidence_incomplete: g.incomplete,
                    endpoints,
                })
                .collect();
            // Stable: equal counts keep the causes' wire-name order.
            causes.sort_by_key(|c| std::cmp::Reverse(c.count));
            let gaps = cx.gaps;
            let evicted = table.stats().evicted;
            DiagnosesAnswer {
                causes,
                node_findings: crate::diagnose::node_findings(cx),
                flows_judged: judged,
                // What the answer may be missing: lost records make flows partial (they are
                // never called unanswered for it); evicted flows are gone from the answer.
                evidence: EvidenceSummary {
                    complete: gaps.total_lost() == 0 && evicted == 0,
                    lost_records: gaps.total_lost(),
                    flows_with_incomplete_evidence: incomplete,
                    flows_evicted: evicted,
                    reader_lag_ms: cx.now_ns.saturating_sub(cx.evidence_now_ns()) / 1_000_000,
                },
                turned_off: cx
                    .pools
                    .ebpf
                    .as_ref()
                    .map(|_| crate::felix_bpf::turned_off())
                    .unwrap_or_default(),
            }
        })
    }

    pub fn flow(&self, id: u64) -> Option<FlowView> {
        self.with_context(|cx, table| {
            let names = self.naming();
            table
                .get(id)
                .map(|f| view::flow_view(f, judge(f, cx), &self.clock, cx, &names))
        })
    }

    /// The flow's kept records and the names of the interfaces they were seen on; None when
    /// there is no such flow or no record left.
    pub fn samples(&self, id: u64) -> Option<(Vec<Sample>, HashMap<u32, String>)> {
        let names: HashMap<u32, String> = {
            let node = self.node();
            node.facts
                .links
                .values()
                .map(|l| (l.index, l.name.clone()))
                .collect()
        };
        let table = lock(&self.table);
        table.get(id)?;
        let samples: Vec<Sample> = table.samples().of(id).into_iter().cloned().collect();
        (!samples.is_empty()).then_some((samples, names))
    }

    /// Everything `/metrics` reports. The verdict and cause counts come from the tally, which
    /// judges only what changed since it last ran.
    pub fn census(&self) -> Census {
        let mut c = Census::default();
        let tally = self.tally_counts();
        for (v, n) in Verdict::ALL.iter().zip(&tally.by_verdict) {
            c.by_verdict.insert(*v, *n);
        }
        for (x, n) in Cause::ALL.iter().zip(&tally.by_cause) {
            c.by_cause.insert(*x, *n);
        }
        c.tally = Some(tally);
        {
            let t = lock(&self.table);
            c.flows = t.len();
            c.table = t.stats();
            let reasons = self.reasons.read().unwrap_or_else(|e| e.into_inner());
            c.drops_by_reason = t
                .drops_by_reason()
                .map(|(r, n)| match r {
                    crate::flows::OTHER_DROP_REASON => ("other".to_string(), n),
                    r => (reasons.name(r), n),
                })
                .collect();
        }
        for a in &self.node().attached {
            *c.attached_by_role.entry(a.role).or_default() += 1;
        }
        c.reader = *lock(&self.reader);
        c.kernel = self.kernel();
        c.ring_bytes = self.ring_bytes();
        c.api = self.api.snapshot();
        c.interned = self.names.read().unwrap_or_else(|e| e.into_inner()).len();
        c.purged = *lock(&self.purged);
        c.identity = self.identities().health();
        c.flow_log = self.flow_log_stats();
        c
    }
}

/// The query asks for a destination and nothing else a flow must be read for: the address
/// index's count is the answer's `matched`.
fn only_dst(q: &FlowQuery) -> bool {
    let FlowQuery {
        pod,
        since,
        dst,
        src,
        port,
        proto,
        verdict,
        cause,
        limit: _,
        namespace,
        selector,
    } = q;
    dst.is_some()
        && pod.is_none()
        && since.is_none()
        && src.is_none()
        && port.is_none()
        && proto.is_none()
        && verdict.is_none()
        && cause.is_none()
        && namespace.is_none()
        && selector.is_none()
}

/// The filters that need no judgement: addresses match the original or the translated tuple.
pub fn matches_tuple(q: &FlowQuery, f: &Flow) -> bool {
    let dsts = [Some(f.dst), f.nat.map(|n| n.dst)];
    let srcs = [Some(f.src), f.nat.map(|n| n.src)];
    let any = |set: &[Option<std::net::IpAddr>], c: &crate::net::Cidr| {
        set.iter().flatten().any(|ip| c.contains(*ip))
    };
    if q.dst.as_ref().is_some_and(|c| !any(&dsts, c)) {
        return false;
    }
    if q.src.as_ref().is_some_and(|c| !any(&srcs, c)) {
        return false;
    }
    if let Some(p) = q.port {
        let ports = [
            Some(f.sport),
            Some(f.dport),
            f.nat.map(|n| n.sport),
            f.nat.map(|n| n.dport),
        ];
        if !ports.iter().flatten().any(|x| *x == p) {
            return false;
        }
    }
    q.proto.is_none_or(|p| f.proto == p)
}
