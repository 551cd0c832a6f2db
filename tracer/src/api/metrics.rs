//! Prometheus text exposition of the agent's state.
use std::fmt::Write;

use tracer_model::{Cause, Role, Verdict};

use crate::{
    flows::Iface,
    state::{footprint::Footprint, Census},
};

/// One metric family.
pub struct Family<'a> {
    pub name: &'a str,
    pub help: &'a str,
    pub kind: &'a str,
    /// (labels, value); labels as `key="value",...` without braces, empty for none.
    pub samples: Vec<(String, f64)>,
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
    };
    let gauge = |name, help, v: f64| Family {
        name,
        help,
        kind: "gauge",
        samples: vec![(String::new(), v)],
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
            help: "Kernel map entries removed with the interface they were keyed with.",
            kind: "counter",
            samples: vec![
                ("map=\"flows\"".to_string(), c.purged.flows as f64),
                ("map=\"turns\"".to_string(), c.purged.turns as f64),
            ],
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
        }]);
        assert!(text.contains("# TYPE tracer_flows_by_verdict gauge\n"));
        assert!(
            text.contains("tracer_flows_by_verdict{verdict=\"no\\\"reply\"} 3\n"),
            "{text}"
        );
    }
}
