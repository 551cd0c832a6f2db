//! `datastore_latency` (verdict `slow_response`): calico-node's exchanges with its datastore
//! are slow enough to threaten its startup.
use tracer_model::{
    diagnosis::{DatastoreLatency, LivenessBudget},
    Cause, Diagnosis, Evidence,
};

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
    let budget_text = match cx.rules.liveness_budget_ns {
        Some(b) => format!(
            " Within calico-node's liveness budget of {:.0} s only about {} such reads fit; a startup that reads every node's keys needs more as the cluster grows, so the probe kills calico-node before it is ready.",
            b as f64 / 1e9,
            (b as f64 / 1e6 / p50_ms).floor()
        ),
        None => " Startup reads the datastore sequentially (every node's keys), so its duration grows with cluster size times this latency; if it outgrows calico-node's liveness probe, the pod is killed while still starting."
            .into(),
    };
    Diagnosis {
        cause: Cause::DatastoreLatency,
        summary: format!(
            "{} request/response exchanges with the datastore {}:{}{} took a median {:.0} ms (p90 {:.0} ms, max {:.0} ms), {:.1} s of waiting in total.{budget_text}",
            s.count,
            dst.0,
            dst.1,
            service_name(dst.1),
            p50_ms,
            f64::from(s.p90_us) / 1000.0,
            s.max_ns as f64 / 1e6,
            s.total_wait_ns as f64 / 1e9,
        ),
        evidence: Evidence::DatastoreLatency(DatastoreLatency {
            budget,
            datastore: format!("{}:{}", dst.0, dst.1),
            exchanges: s.count,
            handshake_ms: flow.handshake_ns().map(|n| n as f64 / 1e6),
            max_ms: s.max_ns as f64 / 1e6,
            p50_ms,
            p90_ms: f64::from(s.p90_us) / 1000.0,
            snat_excluded: None,
            total_wait_ms: s.total_wait_ns / 1_000_000,
        }),
        fix: "Give calico-node time to start: raise its livenessProbe initialDelaySeconds and/or failureThreshold (e.g. 60 s and 10). Better, cut the latency: run the datastore (etcd) close to the nodes, or use the Kubernetes datastore with Typha so nodes do not each read a far etcd."
            .into(),
    }
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::*;
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
        assert_same_json(
            &d.evidence,
            json!({
                "datastore": "10.51.0.10:2379",
                "exchanges": 20,
                "p50_ms": 150.0,
                "p90_ms": 150.0,
                "max_ms": 150.0,
                "total_wait_ms": 3000,
                "handshake_ms": 1.0,
                "budget": {"liveness_budget_s": 3.0, "sequential_reads_that_fit": 20},
            }),
        );
        assert!(d.fix.contains("initialDelaySeconds"));
        // A near datastore is healthy.
        let (t, id) = run(2_000_000);
        let j = judge(
            t.get(id).unwrap_or_else(|| unreachable!()),
            &cx(&p, &f, 100_000_000_000),
        );
        assert_eq!(j.verdicts, vec![Verdict::Replied]);
        assert!(j.diagnosis.is_none());
    }
}
