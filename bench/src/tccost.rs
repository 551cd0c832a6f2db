//! The tc programs' own cost per packet, from BPF_PROG_TEST_RUN (nothing is sent anywhere):
//! noise from other processes barely touches it, so it stands beside every live ratio. Measured
//! in the same run as its floors (floor.rs): the empty program and one hash lookup.
use std::path::Path;

use anyhow::{Context, Result};
use aya::{programs::SchedClassifier, Ebpf, TestRun, TestRunOptions};
use tracer::hooks::{Hooks, LoadOptions};

use crate::{
    floor::Floor,
    report::{On, Row, Target},
    workload::{self, Pkt},
};

/// One packet kind's figures, ns per run: median, min and max of five test runs.
pub struct Timing {
    pub what: &'static str,
    pub median_ns: f64,
    pub min_ns: f64,
    pub max_ns: f64,
}

pub struct Report {
    /// The empty program.
    pub empty: Timing,
    /// One LRU hash lookup that hits, with a key of FlowKey's 44 bytes.
    pub lookup: Timing,
    /// The same with a 16-byte key (an IPv4 tuple and an ifindex fit).
    pub lookup16: Timing,
    /// tracer's program on a known flow's packets, at the default summary interval (1 s): what
    /// nearly every packet of a busy flow costs (no record).
    pub packets: Vec<Timing>,
}

/// The program under test: tracer's own object, or another build of it (ablations).
enum Prog {
    Agent(Hooks),
    Object(Box<Ebpf>),
}

impl Prog {
    fn time(&mut self, egress: bool, frame: &[u8], repeat: u32) -> Result<f64> {
        match self {
            Prog::Agent(h) => Ok(h.time_run(egress, frame, repeat)?.as_nanos() as f64),
            Prog::Object(ebpf) => {
                let name = if egress {
                    tracer_common::PROG_TC_EGRESS
                } else {
                    tracer_common::PROG_TC_INGRESS
                };
                let prog: &mut SchedClassifier = ebpf
                    .program_mut(name)
                    .with_context(|| format!("no program {name}"))?
                    .try_into()?;
                let r = prog.test_run(TestRunOptions {
                    data_in: Some(frame),
                    repeat: repeat.max(1),
                    ..Default::default()
                })?;
                Ok(r.duration.as_nanos() as f64)
            }
        }
    }
}

fn five(mut f: impl FnMut() -> Result<f64>, what: &'static str) -> Result<Timing> {
    let mut ns: Vec<f64> = (0..5).map(|_| f()).collect::<Result<_>>()?;
    ns.sort_by(f64::total_cmp);
    Ok(Timing {
        what,
        median_ns: ns[2],
        min_ns: ns[0],
        max_ns: ns[4],
    })
}

/// Floors and tracer's programs on a known flow's packets, `repeat` runs per test run. With
/// `object`, times that build of tracer-ebpf instead of the agent's (profiling aid).
pub fn measure(repeat: u32, object: Option<&Path>) -> Result<Report> {
    let mut prog = match object {
        None => Prog::Agent(Hooks::load_opts(LoadOptions::default())?.0),
        Some(path) => {
            let bytes =
                std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
            let mut ebpf = Ebpf::load(&bytes)?;
            for name in [
                tracer_common::PROG_TC_INGRESS,
                tracer_common::PROG_TC_EGRESS,
            ] {
                let p: &mut SchedClassifier = ebpf
                    .program_mut(name)
                    .with_context(|| format!("no program {name}"))?
                    .try_into()?;
                p.load()?;
            }
            Prog::Object(Box::new(ebpf))
        }
    };
    let base = workload::flow(2)[0];
    let ack = Pkt {
        flags: 0x10,
        seq: 100,
        ack: 200,
        ..base
    };
    let udp = Pkt {
        udp: true,
        payload: 64 - 42,
        ..base
    };
    let ack_frame = workload::frame(&ack);
    let empty = Floor::load()?;
    let lookup = Floor::load_lookup(44)?;
    let lookup16 = Floor::load_lookup(16)?;
    let mut packets = Vec::new();
    for (what, p) in [("TCP ACK", ack), ("64 B UDP datagram", udp)] {
        let frame = workload::frame(&p);
        // The first run creates the flow's state; time the ones that find it.
        prog.time(p.egress, &frame, 1)?;
        packets.push(five(|| prog.time(p.egress, &frame, repeat), what)?);
    }
    // Bulk payload: each segment must be new (a repeated one is a retransmission, which emits),
    // so one run per test run over distinct segments; the floor is timed the same way below.
    let mut segments: Vec<Vec<u8>> = (0..4096u32)
        .map(|k| {
            workload::frame(&Pkt {
                flags: 0x10,
                seq: 1_000 + k * 1_448,
                ack: 200,
                payload: 1_448,
                ..base
            })
        })
        .collect();
    // Each pass is a fresh flow (a new source port): a second pass over the same segments would
    // be retransmissions. The first segment creates the state; the rest are timed.
    let mut port = 30_000u16;
    let mut bulk_pass = |prog: &mut Prog| -> Result<f64> {
        port += 1;
        let mut sum = 0.0;
        for (k, f) in segments.iter_mut().enumerate() {
            // The source port, at 14 + 20 (IPv4, no options); nothing checks TCP checksums here.
            f[34..36].copy_from_slice(&port.to_be_bytes());
            let ns = prog.time(false, f, 1)?;
            if k > 0 {
                sum += ns;
            }
        }
        Ok(sum / (segments.len() - 1) as f64)
    };
    packets.push(five(
        || bulk_pass(&mut prog),
        "1448 B TCP segment, 1 run per call",
    )?);
    let bulk_floor = five(
        || {
            let mut sum = 0.0;
            for _ in 0..segments.len() {
                sum += empty.time(&ack_frame, 1)?;
            }
            Ok(sum / segments.len() as f64)
        },
        "empty program, 1 run per call",
    )?;
    packets.push(bulk_floor);
    Ok(Report {
        empty: five(|| empty.time(&ack_frame, repeat), "empty program")?,
        lookup: five(
            || lookup.time(&ack_frame, repeat),
            "one hash lookup, 44 B key",
        )?,
        lookup16: five(
            || lookup16.time(&ack_frame, repeat),
            "one hash lookup, 16 B key",
        )?,
        packets,
    })
}

impl Report {
    pub fn print(&self) {
        let line = |t: &Timing, floor: f64| {
            println!(
                "{:<40} median {:>6.1} ns (range {:.1}-{:.1}), {:>5.2}x the empty program",
                t.what,
                t.median_ns,
                t.min_ns,
                t.max_ns,
                t.median_ns / floor.max(0.1)
            );
        };
        let floor = self.empty.median_ns;
        line(&self.empty, floor);
        line(&self.lookup, floor);
        line(&self.lookup16, floor);
        for t in &self.packets {
            line(t, floor);
        }
    }
}

/// The report as table rows, with the per-packet targets: a known flow's packet <= 100 ns and
/// <= 2.5x the empty program.
pub fn rows(section: &'static str, repeat: u32) -> Result<Vec<Row>> {
    let r = measure(repeat, None)?;
    let floor = r.empty.median_ns;
    let mut rows = Vec::new();
    let range = |t: &Timing| format!("{:.0}-{:.0} ns", t.min_ns, t.max_ns);
    for t in [&r.empty, &r.lookup, &r.lookup16] {
        rows.push(
            Row::new(
                section,
                format!(
                    "floor: {} (BPF_PROG_TEST_RUN, median of 5 x {repeat}, {}; info)",
                    t.what,
                    range(t)
                ),
                t.median_ns,
                "ns",
            )
            .baseline(floor),
        );
    }
    for t in &r.packets {
        if t.what.starts_with("empty program") {
            rows.push(Row::new(
                section,
                format!("floor: {} (BPF_PROG_TEST_RUN, {}; info)", t.what, range(t)),
                t.median_ns,
                "ns",
            ));
            continue;
        }
        let row = Row::new(
            section,
            format!(
                "tc program, known flow: {} (BPF_PROG_TEST_RUN, {}; {:.1}x the one-lookup floor)",
                t.what,
                range(t),
                t.median_ns / r.lookup.median_ns.max(0.1)
            ),
            t.median_ns,
            "ns",
        );
        rows.push(if t.what.contains("1 run per call") {
            row
        } else {
            row.baseline(floor)
                .target(Target::AtMost(2.5), On::Ratio, "<= 2.5x empty")
                .extra(t.median_ns <= 100.0, "<= 100 ns")
        });
    }
    Ok(rows)
}
