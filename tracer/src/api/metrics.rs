//! Prometheus text exposition of the agent's state.
use std::fmt::Write;

use tracer_model::{Cause, Role, Verdict};

use crate::{
    flows::Iface,
    state::{footprint::Footprint, Census, Histogram},
};

/// One metric family.
pub struct Family<'a> {
    pub name: &'a str,
    pub help: &'a str,
    pub kind: &'a str,
    /// (labels, value); labels as `key="value",...` without braces, empty for none.
    pub samples: Vec<(String, f64)>,
    /// A histogram's series, rendered after `samples` (which it leaves empty).
    pub histogram: Option<&'a Histogram>,
}

pub fn render(families: &[Family<'_>]) -> String {
    let mut out = String::new();
    for f in families {
        let _ = writeln!(out, "# HELP {} {}", f.name, f.help);
        let _ = writeln!(out, "# TYPE {} {}", f.name, f.kind);
        for (labels, v) in &f.samples {
            if labels.is_empty() {
                let _ = writeln!(out, "{} {}", f.name, v);
            } else {
                let _ = writeln!(out, "{}{{{}}} {}", f.name, labels, v);
            }
        }
        if let Some(h) = f.histogram {
            // Buckets are cumulative; the +Inf bucket equals _count.
            let mut acc = 0u64;
            for (i, n) in h.counts.iter().enumerate() {
                acc += n;
                let le = h
                    .bounds
                    .get(i)
                    .map_or("+Inf".to_string(), |b| b.to_string());
                let _ = writeln!(out, "{}_bucket{{le=\"{le}\"}} {acc}", f.name);
            }
            let _ = writeln!(out, "{}_sum {}", f.name, h.sum);
            let _ = writeln!(out, "{}_count {acc}", f.name);
        }
    }
    out
}

/// Escapes a label value (backslash, quote, newline).
pub fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// `/metrics`: the census, plus the process's own footprint read now.
pub fn exposition(c: &Census) -> String {
    let counter = |name, help, v: u64| Family {
        name,
        help,
        kind: "counter",
        samples: vec![(String::new(), v as f64)],
        histogram: None,
    };
    let gauge = |name, help, v: f64| Family {
        name,
        help,
        kind: "gauge",
        samples: vec![(String::new(), v)],
        histogram: None,
    };
    let k = &c.kernel;
    let api = &c.api;
    let fp = Footprint::now();
    let mut families = vec![
        gauge(
            "tracer_flows",
            "Flows in the agent's table.",
            c.flows as f64,
        ),
        Family {
            name: "tracer_flows_by_verdict",
            help: "Flows in the table by verdict.",
            kind: "gauge",
            samples: Verdict::ALL
                .iter()
                .map(|v| {
                    (
                        format!("verdict=\"{}\"", label(v.as_str())),
                        c.by_verdict.get(v).copied().unwrap_or(0) as f64,
                    )
                })
                .collect(),
            histogram: None,
        },
        Family {
            name: "tracer_flows_by_cause",
            help: "Flows in the table by diagnosed cause.",
            kind: "gauge",
            samples: Cause::ALL
                .iter()
                .map(|x| {
                    (
                        format!("cause=\"{}\"", label(x.as_str())),
                        c.by_cause.get(x).copied().unwrap_or(0) as f64,
                    )
                })
                .collect(),
            histogram: None,
        },
        counter(
            "tracer_kernel_packets_total",
            "Packets the tc programs saw.",
            k.packets,
        ),
        counter(
            "tracer_kernel_records_total",
            "Records the kernel wrote to the ring buffer.",
            k.records,
        ),
        counter(
            "tracer_kernel_records_lost_total",
            "Records lost because the ring buffer was full.",
            k.lost,
        ),
        counter(
            "tracer_kernel_malformed_total",
            "Packets whose headers could not be parsed.",
            k.malformed,
        ),
        counter(
            "tracer_kernel_drops_total",
            "Kernel drops with a reportable reason (any packet).",
            k.drops,
        ),
        gauge(
            "tracer_ringbuf_pending_bytes",
            "Ring-buffer bytes not yet consumed by the agent, as last seen by the kernel.",
            k.ringbuf_pending_bytes as f64,
        ),
        Family {
            name: "tracer_attached_interfaces",
            help: "Interfaces with tracer's tc programs, by role.",
            kind: "gauge",
            samples: Role::ALL
                .iter()
                .map(|r| {
                    (
                        format!("role=\"{r}\""),
                        c.attached_by_role.get(r).copied().unwrap_or(0) as f64,
                    )
                })
                .collect(),
            histogram: None,
        },
        counter(
            "tracer_records_decoded_total",
            "Ring-buffer records the agent read.",
            c.reader.records,
        ),
        counter(
            "tracer_decode_errors_total",
            "Ring-buffer records the agent could not decode.",
            c.reader.decode_errors,
        ),
        gauge(
            "tracer_api_connections",
            "API connections open now.",
            api.connections as f64,
        ),
        counter(
            "tracer_api_connections_rejected_total",
            "API connections refused because all connection slots were taken.",
            api.connections_rejected,
        ),
        gauge(
            "tracer_api_watchers",
            "/watch streams open now.",
            api.watchers as f64,
        ),
        counter(
            "tracer_api_watchers_rejected_total",
            "/watch requests refused (429) because --max-watchers streams were open.",
            api.watchers_rejected,
        ),
        counter(
            "tracer_flows_evicted_total",
            "Flows evicted because the table was full.",
            c.table.evicted,
        ),
        counter(
            "tracer_drops_matched_total",
            "Kernel drops attributed to a traced flow.",
            c.table.drops,
        ),
        Family {
            name: "tracer_kernel_entries_purged_total",
            help: "Kernel map entries (and per-CPU cache slots) removed with the interface they were keyed with.",
            kind: "counter",
            samples: vec![
                ("map=\"flows\"".to_string(), c.purged.flows as f64),
                ("map=\"turns\"".to_string(), c.purged.turns as f64),
                ("map=\"flow_cache\"".to_string(), c.purged.cached as f64),
            ],
            histogram: None,
        },
        gauge(
            "process_resident_memory_bytes",
            "Resident memory of the agent process.",
            fp.rss_bytes as f64,
        ),
        gauge(
            "process_open_fds",
            "Open file descriptors of the agent process.",
            fp.fds as f64,
        ),
        gauge(
            "tracer_interfaces_interned",
            "Interface records interned for naming hops: one per attached interface.",
            c.interned as f64,
        ),
        gauge(
            "tracer_interface_records",
            "Interface records alive: the interned ones plus those only flows over renamed \
             or deleted interfaces still hold (freed as those flows are evicted).",
            Iface::live() as f64,
        ),
        gauge(
            "tracer_bpf_links",
            "BPF link objects the agent holds open (two per interface under TCX).",
            fp.bpf_links as f64,
        ),
    ];
    families.push(Family {
        name: "tracer_kernel_drops_by_reason_total",
        help: "Kernel drops of traced flows' packets, by the kernel's drop reason.",
        kind: "counter",
        samples: c
            .drops_by_reason
            .iter()
            .map(|(r, n)| (format!("reason=\"{}\"", label(r)), *n as f64))
            .collect(),
        histogram: None,
    });
    if let Some(t) = &c.tally {
        families.push(Family {
            name: "tracer_diagnoses_total",
            help: "Flows diagnosed, by cause: a flow counts once per cause, when it first \
                   reaches that diagnosis.",
            kind: "counter",
            samples: Cause::ALL
                .iter()
                .zip(&t.diagnoses)
                .map(|(x, n)| (format!("cause=\"{}\"", label(x.as_str())), *n as f64))
                .collect(),
            histogram: None,
        });
        families.push(Family {
            name: "tracer_diagnoses_by_workload_total",
            help: "Flows diagnosed, by cause and the pod at either end (identity on): its \
                   namespace and owning workload. At most 256 namespace/workload pairs get \
                   their own labels; the rest count under \"_other\".",
            kind: "counter",
            samples: t
                .by_workload
                .iter()
                .filter_map(|((c, ns, kind, name), n)| {
                    let cause = Cause::ALL.get(*c as usize)?;
                    Some((
                        format!(
                            "cause=\"{}\",namespace=\"{}\",workload_kind=\"{}\",workload=\"{}\"",
                            label(cause.as_str()),
                            label(ns),
                            label(kind),
                            label(name)
                        ),
                        *n as f64,
                    ))
                })
                .collect(),
            histogram: None,
        });
        families.push(Family {
            name: "tracer_time_to_diagnosis_seconds",
            help: "From a flow's first packet to the agent first diagnosing it.",
            kind: "histogram",
            samples: Vec::new(),
            histogram: Some(&t.time_to_diagnosis),
        });
        families.push(Family {
            name: "tracer_first_reply_seconds",
            help: "From a flow's first packet to its first reply, as the node saw them.",
            kind: "histogram",
            samples: Vec::new(),
            histogram: Some(&t.first_reply),
        });
        families.push(counter(
            "tracer_tally_full_passes_total",
            "Times the metrics tally re-judged every flow (the node, drop-reason names or \
             lost records changed).",
            t.full_passes,
        ));
    }
    if let Some(l) = &c.flow_log {
        families.push(Family {
            name: "tracer_flow_log_lines_total",
            help: "Flows handed to the flow log's writer, by why they were written then.",
            kind: "counter",
            samples: [
                (tracer_model::LogReason::Settled, l.settled),
                (tracer_model::LogReason::Evicted, l.evicted),
                (tracer_model::LogReason::Shutdown, l.shutdown),
            ]
            .iter()
            .map(|(why, n)| (format!("logged=\"{}\"", why.as_str()), *n as f64))
            .collect(),
            histogram: None,
        });
        families.push(counter(
            "tracer_flow_log_dropped_total",
            "Flows never written to the flow log: its writer fell behind.",
            l.dropped,
        ));
        families.push(counter(
            "tracer_flow_log_write_errors_total",
            "Flow log lines lost to write errors.",
            l.write_errors,
        ));
    }
    if let Some(size) = c.ring_bytes {
        families.push(gauge(
            "tracer_ringbuf_size_bytes",
            "Size of the ring buffer: tracer_ringbuf_pending_bytes over it is the ring's fill.",
            size as f64,
        ));
    }
    if let Some(cpu) = fp.cpu_seconds {
        families.push(Family {
            name: "process_cpu_seconds_total",
            help: "User and system CPU time of the agent process.",
            kind: "counter",
            samples: vec![(String::new(), cpu)],
            histogram: None,
        });
    }
    // Only while identity is on: an agent without a datastore has nothing to be stale about.
    let id = &c.identity;
    if id.source != tracer_model::identity::IdentitySource::Off {
        families.push(gauge(
            "tracer_identity_stale",
            "1 while the identity datastore is unreachable and names are the last known ones.",
            if id.stale { 1.0 } else { 0.0 },
        ));
        families.push(gauge(
            "tracer_identity_synced",
            "1 once a full view of pods, Services and nodes has been read.",
            if id.synced { 1.0 } else { 0.0 },
        ));
        if let Some(age) = id.last_sync_age_s {
            families.push(gauge(
                "tracer_identity_last_sync_age_seconds",
                "Seconds since the datastore last confirmed the view (a list or an event).",
                age,
            ));
        }
        families.push(Family {
            name: "tracer_identity_objects",
            help: "Objects that name addresses, by kind.",
            kind: "gauge",
            samples: vec![
                ("kind=\"pod\"".to_string(), id.pods as f64),
                ("kind=\"service\"".to_string(), id.services as f64),
                ("kind=\"node\"".to_string(), id.nodes as f64),
            ],
            histogram: None,
        });
    }
    if let (Some(used), Some(free)) = (fp.heap_bytes, fp.heap_free_bytes) {
        families.push(gauge(
            "tracer_heap_bytes",
            "Heap bytes in use by the agent (malloc's view).",
            used as f64,
        ));
        families.push(gauge(
            "tracer_heap_free_bytes",
            "Heap bytes malloc holds but are free (fragmentation, untrimmed).",
            free as f64,
        ));
    }
    render(&families)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_exposition_format() {
        let text = render(&[Family {
            name: "tracer_flows_by_verdict",
            help: "Flows by verdict.",
            kind: "gauge",
            samples: vec![(format!("verdict=\"{}\"", label("no\"reply")), 3.0)],
            histogram: None,
        }]);
        assert!(text.contains("# TYPE tracer_flows_by_verdict gauge\n"));
        assert!(
            text.contains("tracer_flows_by_verdict{verdict=\"no\\\"reply\"} 3\n"),
            "{text}"
        );
    }

    #[test]
    fn follows_the_exposition_conventions() {
        let shared = crate::state::Shared::new(&crate::state::StateConfig::default());
        let text = exposition(&shared.census());
        let mut types = std::collections::HashMap::new();
        for l in text.lines().filter(|l| l.starts_with("# TYPE ")) {
            let mut w = l.split_whitespace().skip(2);
            let (name, kind) = (w.next().unwrap_or(""), w.next().unwrap_or(""));
            assert!(types.insert(name, kind).is_none(), "{name} typed twice");
            if kind == "counter" {
                assert!(name.ends_with("_total"), "counter {name} without _total");
            }
        }
        // Every cause's counter is there at 0 from the start, so increase() sees its first step.
        for c in Cause::ALL {
            assert!(text.contains(&format!("tracer_diagnoses_total{{cause=\"{c}\"}} 0\n")));
        }
        assert_eq!(
            types.get("tracer_time_to_diagnosis_seconds"),
            Some(&"histogram")
        );
        assert!(text.contains("tracer_time_to_diagnosis_seconds_bucket{le=\"+Inf\"} 0\n"));
        // Every sample belongs to a typed family.
        for l in text.lines().filter(|l| !l.starts_with('#')) {
            let name = l.split(['{', ' ']).next().unwrap_or("");
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| {
                    name.strip_suffix(s)
                        .filter(|f| types.get(f) == Some(&"histogram"))
                })
                .unwrap_or(name);
            assert!(types.contains_key(family), "{l}: no TYPE");
        }
    }

    #[test]
    fn renders_histograms_cumulatively() {
        let h = Histogram {
            bounds: &[0.5, 1.0],
            counts: vec![2, 0, 1],
            sum: 4.5,
        };
        let text = render(&[Family {
            name: "x_seconds",
            help: "x.",
            kind: "histogram",
            samples: Vec::new(),
            histogram: Some(&h),
        }]);
        assert!(text.ends_with(
            "x_seconds_bucket{le=\"0.5\"} 2\nx_seconds_bucket{le=\"1\"} 2\n\
             x_seconds_bucket{le=\"+Inf\"} 3\nx_seconds_sum 4.5\nx_seconds_count 3\n"
        ));
    }
}
