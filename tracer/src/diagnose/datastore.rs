//! `datastore_latency` (verdict `slow_response`): calico-node's exchanges with its datastore
//! are slow enough to threaten its startup.
use tracer_model::{
    diagnosis::{DatastoreLatency, LivenessBudget},
    startup::{self, BudgetBasis, Install, Outcome, ProbeBudget, ReadPattern, StartupProjection},
    Cause, Diagnosis, Evidence,
};

use std::net::SocketAddr;

use super::{service_name, Context, Findings};
use crate::flows::Flow;

/// Exchanges with the datastore that are slow.
pub struct Slow {
    count: u64,
    p50_us: u32,
    p90_us: u32,
    max_ns: u64,
    total_wait_ns: u64,
}

pub fn slow_exchanges(flow: &Flow, cx: &Context<'_>) -> Option<Slow> {
    // The agent's own datastore watch answers whenever the datastore next changes.
    if cx
        .facts
        .own_sockets
        .contains(&SocketAddr::new(flow.src, flow.sport))
    {
        return None;
    }
    let port = flow.nat.map(|n| n.dport).unwrap_or(flow.dport);
    if !cx.rules.datastore_ports.contains(&port) && !cx.rules.datastore_ports.contains(&flow.dport)
    {
        return None;
    }
    let e = &flow.exchanges;
    let p50 = e.quantile_us(0.5)?;
    if u64::from(p50) * 1000 < cx.rules.slow_ns {
        return None;
    }
    Some(Slow {
        count: u64::from(e.count),
        p50_us: p50,
        p90_us: e.quantile_us(0.9).unwrap_or(p50),
        max_ns: e.max_ns(),
        total_wait_ns: e.total_wait_ns,
    })
}

pub fn diagnose(flow: &Flow, cx: &Context<'_>, f: &Findings<'_>) -> Option<Diagnosis> {
    f.slow.as_ref().map(|s| diagnosis(flow, cx, s))
}

fn diagnosis(flow: &Flow, cx: &Context<'_>, s: &Slow) -> Diagnosis {
    let dst = flow
        .nat
        .map(|n| (n.dst, n.dport))
        .unwrap_or((flow.dst, flow.dport));
    let p50_ms = f64::from(s.p50_us) / 1000.0;
    let budget = cx.rules.liveness_budget_ns.map(|b| {
        let reads = (b as f64 / 1e6 / p50_ms).floor() as u64;
        LivenessBudget {
            liveness_budget_s: b as f64 / 1e9,
            sequential_reads_that_fit: reads,
        }
    });
    let handshake_ms = flow.handshake_ns().map(|n| n as f64 / 1e6);
    let startup = projection(cx.rules.liveness_budget_ns, dst.1, handshake_ms, p50_ms);
    Diagnosis {
        cause: Cause::DatastoreLatency,
        summary: format!(
            "{} request/response exchanges with the datastore {}:{}{} took a median {:.0} ms (p90 {:.0} ms, max {:.0} ms), {:.1} s of waiting in total. {}",
            s.count,
            dst.0,
            dst.1,
            service_name(dst.1),
            p50_ms,
            f64::from(s.p90_us) / 1000.0,
            s.max_ns as f64 / 1e6,
            s.total_wait_ns as f64 / 1e9,
            startup_text(&startup),
        ),
        evidence: Evidence::DatastoreLatency(DatastoreLatency {
            budget,
            datastore: format!("{}:{}", dst.0, dst.1),
            exchanges: s.count,
            handshake_ms,
            max_ms: s.max_ns as f64 / 1e6,
            p50_ms,
            p90_ms: f64::from(s.p90_us) / 1000.0,
            snat_excluded: None,
            startup: Some(startup),
            total_wait_ms: s.total_wait_ns / 1_000_000,
        }),
        fix: FIX.into(),
    }
}

/// etcd's client port: only manifest installs point calico-node at etcd.
const ETCD_PORT: u16 = 2379;

/// Which budgets apply, and why: the flag, else the install kind the datastore implies.
fn projection(
    flag_ns: Option<u64>,
    port: u16,
    handshake_ms: Option<f64>,
    p50_ms: f64,
) -> StartupProjection {
    let basis = match (flag_ns, port) {
        (Some(_), _) => BudgetBasis::LivenessBudgetFlag,
        (None, ETCD_PORT) => BudgetBasis::EtcdMeansManifest,
        (None, _) => BudgetBasis::UnknownInstallKind,
    };
    let budgets = basis.budgets(flag_ns.map(|b| b as f64 / 1e9));
    startup::project(basis, budgets, handshake_ms.unwrap_or(p50_ms), p50_ms)
}

fn install_name(b: &ProbeBudget) -> String {
    let who = match b.install {
        Install::Manifest => "manifest",
        Install::Operator => "operator",
        Install::OperatorStartupProbe => "operator",
        Install::Flag => "--liveness-budget",
    };
    if b.kill_from_s == b.kill_by_s {
        format!("{who} {} ({:.1} s)", b.probe, b.kill_by_s)
    } else {
        format!(
            "{who} {} (killed {:.0}-{:.0} s after the start)",
            b.probe, b.kill_from_s, b.kill_by_s
        )
    }
}

fn outcome_name(o: Outcome) -> &'static str {
    match o {
        Outcome::Fits => "fits",
        Outcome::AtRisk => "is at risk (inside the kill window)",
        Outcome::Killed => "is killed",
    }
}

/// One sentence per read pattern, against every budget.
fn startup_text(p: &StartupProjection) -> String {
    let mut out = format!("Budget: {}.", p.basis_note);
    for pat in &p.patterns {
        let per: Vec<String> = pat
            .fits
            .iter()
            .zip(&p.budgets)
            .map(|(f, b)| match (f.outcome, f.max_nodes) {
                (Some(o), _) => format!("{} under the {}", outcome_name(o), install_name(b)),
                (None, Some(n)) => format!("at most {n} nodes under the {}", install_name(b)),
                (None, None) => String::new(),
            })
            .collect();
        match pat.pattern {
            ReadPattern::CalicoV3Etcdv3 => out.push_str(&format!(
                " Calico v3 start-up ({} exchanges whatever the cluster size: its node List is one request) takes about {:.1} s at this latency and {}.",
                pat.fixed_exchanges,
                pat.fixed_s,
                per.join(", ")
            )),
            ReadPattern::CalicoV2Etcdv2 => out.push_str(&format!(
                " Calico v2.x on etcdv2 reads {} keys per node ({} + {} x nodes exchanges, {:.1} s + {:.2} s per node): {}.",
                pat.per_node_exchanges,
                pat.fixed_exchanges,
                pat.per_node_exchanges,
                pat.fixed_s,
                pat.per_node_s,
                per.join(", ")
            )),
        }
    }
    out
}

const FIX: &str = "Give calico-node time to start, or cut the latency. Manifest install: edit the calico-node DaemonSet (kubectl -n kube-system edit ds calico-node) and raise livenessProbe initialDelaySeconds and/or failureThreshold so that initialDelaySeconds + (failureThreshold - 1) x periodSeconds exceeds the projected start-up (the seed's fix: 60 s and 10), or add a startupProbe. Operator install (it reverts DaemonSet edits): set the probe timings in the Installation, spec.calicoNodeDaemonSet.spec.template.spec.containers[name=calico-node].livenessProbe (and startupProbe where the operator has one) with initialDelaySeconds/periodSeconds/failureThreshold (operator v1.43+). Better, cut the latency: run the datastore close to the nodes, or use the Kubernetes datastore with Typha so nodes do not each read a far etcd; on Calico v2.x, upgrading to v3 removes the per-node reads (its node List is one request).";

#[cfg(test)]
mod tests {
    use super::super::fixtures::*;
    use tracer_model::startup::{BudgetBasis, Install};

    #[test]
    fn the_budget_says_why_it_was_chosen() {
        use super::projection;
        // The flag wins.
        let p = projection(Some(70_000_000_000), 6443, None, 200.0);
        assert_eq!(p.basis, BudgetBasis::LivenessBudgetFlag);
        assert_eq!(p.budgets.len(), 1);
        assert_eq!(p.connect_ms, 200.0);
        // etcd: only manifests point calico-node at etcd.
        let p = projection(None, 2379, Some(150.0), 150.0);
        assert_eq!(p.basis, BudgetBasis::EtcdMeansManifest);
        let kinds: Vec<_> = p.budgets.iter().map(|b| b.install).collect();
        assert_eq!(kinds, [Install::Manifest]);
        // The apiserver or Typha: either kind, every budget shown.
        let p = projection(None, 6443, Some(150.0), 150.0);
        assert_eq!(p.basis, BudgetBasis::UnknownInstallKind);
        let kinds: Vec<_> = p.budgets.iter().map(|b| b.install).collect();
        assert_eq!(
            kinds,
            [
                Install::Manifest,
                Install::Operator,
                Install::OperatorStartupProbe
            ]
        );
        assert!(super::startup_text(&p).contains("unknown install kind"));
    }

    #[test]
    fn seed_001_slow_datastore_exchanges() {
        let f = underlay_node("10.51.0.100", vec![]);
        let p = pools(&[], &[]);
        let run = |delay_ns: u64| {
            let mut t = FlowTable::new(10);
            let s = syn("10.51.0.100", "10.51.0.10", 2379);
            let id = t.ingest(&obs(0, 2, Dir::Egress, s), &lookup2).unwrap_or(0);
            let mut r = s;
            std::mem::swap(&mut r.src, &mut r.dst);
            std::mem::swap(&mut r.sport, &mut r.dport);
            r.tcp_flags = 0x12;
            t.ingest(&obs(1_000_000, 2, Dir::Ingress, r), &lookup2);
            let mut ts = 2_000_000;
            for i in 0..20u32 {
                let mut q = s;
                q.tcp_flags = 0x18;
                q.payload_len = 80;
                q.seq = 10 + i;
                t.ingest(&obs(ts, 2, Dir::Egress, q), &lookup2);
                ts += delay_ns;
                let mut a = r;
                a.tcp_flags = 0x18;
                a.payload_len = 400;
                a.seq = 100 + i;
                t.ingest(&obs(ts, 2, Dir::Ingress, a), &lookup2);
                ts += 1_000_000;
            }
            (t, id)
        };
        let (t, id) = run(150_000_000);
        let rules = Rules {
            liveness_budget_ns: Some(3_000_000_000),
            ..Rules::default()
        };
        let c = Context {
            rules: &rules,
            ..cx(&p, &f, 100_000_000_000)
        };
        let j = judge(t.get(id).unwrap_or_else(|| unreachable!()), &c);
        assert_eq!(j.verdicts, vec![Verdict::Replied, Verdict::SlowResponse]);
        let d = j.diagnosis.unwrap_or_else(|| unreachable!());
        assert_eq!(d.cause, Cause::DatastoreLatency);
        assert_eq!(ev(&d.evidence)["exchanges"], 20);
        assert_eq!(ev(&d.evidence)["p50_ms"], 150.0);
        assert_eq!(ev(&d.evidence)["budget"]["sequential_reads_that_fit"], 20);
        let mut e = ev(&d.evidence);
        let startup = e
            .as_object_mut()
            .and_then(|o| o.remove("startup"))
            .unwrap_or_default();
        // The fields from before the projection keep their names and values.
        assert_eq!(
            serde_json::to_string(&e).unwrap_or_default(),
            serde_json::to_string(&json!({
                "datastore": "10.51.0.10:2379",
                "exchanges": 20,
                "p50_ms": 150.0,
                "p90_ms": 150.0,
                "max_ms": 150.0,
                "total_wait_ms": 3000,
                "handshake_ms": 1.0,
                "budget": {"liveness_budget_s": 3.0, "sequential_reads_that_fit": 20},
            }))
            .unwrap_or_default()
        );
        assert_eq!(startup["basis"], "liveness_budget_flag");
        assert_eq!(startup["budgets"][0]["kill_by_s"], 3.0);
        assert_eq!(startup["per_exchange_ms"], 150.0);
        assert_eq!(startup["connect_ms"], 1.0);
        // v3: 0.001 + 13 x 0.15 s fits 3 s; v2: 0.001 + 28 x 0.15 s does not.
        assert_eq!(startup["patterns"][0]["pattern"], "calico_v3_etcdv3");
        assert_eq!(startup["patterns"][0]["fits"][0]["outcome"], "fits");
        assert_eq!(startup["patterns"][1]["pattern"], "calico_v2_etcdv2");
        assert_eq!(startup["patterns"][1]["fits"][0]["max_nodes"], 0);
        assert!(
            d.summary.contains("--liveness-budget, as given"),
            "{}",
            d.summary
        );
        assert!(d.fix.contains("calicoNodeDaemonSet"));
        assert!(d.fix.contains("initialDelaySeconds"));
        // A near datastore is healthy.
        let (t, id) = run(2_000_000);
        let j = judge(
            t.get(id).unwrap_or_else(|| unreachable!()),
            &cx(&p, &f, 100_000_000_000),
        );
        assert_eq!(j.verdicts, vec![Verdict::Replied]);
        assert!(j.diagnosis.is_none());
        // The agent's own connection (its datastore watch) is never judged slow.
        let (t, id) = run(150_000_000);
        let mut own = f.clone();
        own.own_sockets.insert(
            "10.51.0.100:40000"
                .parse()
                .unwrap_or_else(|_| unreachable!()),
        );
        let c = Context {
            rules: &rules,
            ..cx(&p, &own, 100_000_000_000)
        };
        let j = judge(t.get(id).unwrap_or_else(|| unreachable!()), &c);
        assert_eq!(j.verdicts, vec![Verdict::Replied]);
        assert!(j.diagnosis.is_none());
    }
}
