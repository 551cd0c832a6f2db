//! Section 2: agent throughput. Records come from the real tc programs through the real ring
//! buffer (BPF_PROG_TEST_RUN on synthetic frames, summary interval 0 so every packet emits one),
//! then are drained, decoded and correlated on one thread as the agent's reader does.
use std::{
    collections::VecDeque,
    hint::black_box,
    os::fd::AsRawFd,
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
    time::{Duration, Instant},
};

use anyhow::{bail, Result};
use aya::maps::{MapData, RingBuf};
use tracer::{
    agent::AgentConfig,
    events::{decode, Observation},
    flows::{FlowTable, Iface},
    hooks::{Hooks, KernelCounters},
    state::Shared,
};

use crate::{
    report::{On, Row, Target},
    workload::{self, Pkt},
    Opts,
};

const SECTION: &str = "2 agent throughput";
/// The agent's reader ingests in batches of this many records (agent::read_events).
const BATCH: usize = 4096;
/// Records per fill: below the 8 MiB ring's ~52k records of 160 bytes.
const FILL: u64 = 40_000;

/// Interleaves the packets of WINDOW concurrent flows, as a busy node would.
pub struct Gen {
    next_flow: u64,
    active: VecDeque<(u64, std::vec::IntoIter<Pkt>)>,
}

const WINDOW: usize = 64;

impl Gen {
    /// Flows numbered from `first` (distinct generators must not overlap).
    pub fn new(first: u64) -> Gen {
        Gen {
            next_flow: first,
            active: VecDeque::with_capacity(WINDOW),
        }
    }

    pub fn next_pkt(&mut self) -> Pkt {
        loop {
            while self.active.len() < WINDOW {
                let i = self.next_flow;
                self.next_flow += 1;
                self.active.push_back((i, workload::flow(i).into_iter()));
            }
            if let Some((i, mut it)) = self.active.pop_front() {
                if let Some(p) = it.next() {
                    self.active.push_back((i, it));
                    return p;
                }
            }
        }
    }
}

/// Runs test_run on generated packets until at least `n` records were emitted.
fn fill(hooks: &mut Hooks, gen: &mut Gen, n: u64) -> Result<u64> {
    let mut produced = 0;
    while produced < n {
        let p = gen.next_pkt();
        hooks.test_run(p.egress, &workload::frame(&p), p.repeat)?;
        produced += u64::from(p.repeat);
    }
    Ok(produced)
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    /// RingBuf::next only: the floor.
    Drain,
    /// + events::decode.
    Decode,
    /// + Shared::ingest in batches of 4096: the agent's reader.
    Agent,
    /// + FlowTable::ingest with a lookup that allocates nothing (no Shared, no name map).
    Table,
}

struct Consumer {
    shared: Shared,
    table: FlowTable,
    batch: Vec<Observation>,
    /// The one interface the allocation-free lookup hands out (the records come from lo).
    name: std::sync::Arc<Iface>,
}

impl Consumer {
    fn new() -> Consumer {
        Consumer {
            shared: Shared::new(&AgentConfig::default().state()),
            table: FlowTable::new(AgentConfig::default().flow_cap),
            batch: Vec::with_capacity(BATCH),
            name: Iface::new("lo", 1, None),
        }
    }

    /// Drains everything on the ring; returns the number of records.
    fn drain(&mut self, ring: &mut RingBuf<MapData>, mode: Mode) -> u64 {
        let mut n = 0u64;
        let mut errors = 0u64;
        while let Some(item) = ring.next() {
            n += 1;
            if mode == Mode::Drain {
                black_box(item.len());
                continue;
            }
            match decode(&item) {
                Ok(o) => self.batch.push(o),
                Err(_) => errors += 1,
            }
            drop(item);
            if self.batch.len() >= BATCH {
                self.flush(mode, std::mem::take(&mut errors));
            }
        }
        if !self.batch.is_empty() || errors > 0 {
            self.flush(mode, errors);
        }
        n
    }

    fn flush(&mut self, mode: Mode, errors: u64) {
        match mode {
            Mode::Drain | Mode::Decode => {
                black_box(&self.batch);
            }
            Mode::Agent => self.shared.ingest(&self.batch, errors),
            Mode::Table => {
                let name = self.name.clone();
                let lookup = move |i: u32| {
                    if i == name.ifindex {
                        name.clone()
                    } else {
                        Iface::unnamed(i)
                    }
                };
                for o in &self.batch {
                    self.table.ingest(o, &lookup);
                }
            }
        }
        self.batch.clear();
    }
}

/// FlowTable::ingest of pre-built observations for `flows` flows (interleaved like Gen's) with
/// real hop structure and interned names: the correlation cost alone, without ring, decode or
/// Shared. Returns (records, seconds).
pub fn ingest_in_process(flows: u64) -> (u64, f64) {
    let mut table = FlowTable::new(AgentConfig::default().flow_cap);
    let mut obs = Vec::new();
    let mut ts = 1_000_000_000u64;
    for chunk in (0..flows).collect::<Vec<_>>().chunks(WINDOW) {
        let per: Vec<Vec<Pkt>> = chunk.iter().map(|&i| workload::flow(i)).collect();
        let longest = per.iter().map(Vec::len).max().unwrap_or(0);
        for k in 0..longest {
            for (j, pkts) in per.iter().enumerate() {
                if let Some(p) = pkts.get(k) {
                    ts += 1_000;
                    obs.push(workload::observation(chunk[j], p, ts));
                }
            }
        }
    }
    let t = Instant::now();
    for o in &obs {
        table.ingest(o, &workload::iface);
    }
    (obs.len() as u64, t.elapsed().as_secs_f64())
}

pub fn run(opts: &Opts) -> Result<Vec<Row>> {
    let (mut hooks, mut ring, counters) = Hooks::load(0)?;
    let mut rows = throughput(opts, &mut hooks, &mut ring, &counters)?;
    rows.extend(loss(opts, &mut hooks, &mut ring, &counters)?);
    Ok(rows)
}

fn throughput(
    opts: &Opts,
    hooks: &mut Hooks,
    ring: &mut RingBuf<MapData>,
    counters: &KernelCounters,
) -> Result<Vec<Row>> {
    let agent_records: u64 = if opts.quick { 400_000 } else { 2_000_000 };
    let modes = [Mode::Drain, Mode::Decode, Mode::Agent, Mode::Table];
    // One generator and one consumer per mode: each table sees whole flows.
    let mut gens: Vec<Gen> = (0..modes.len() as u64).map(|m| Gen::new(m << 32)).collect();
    let mut consumers: Vec<Consumer> = modes.iter().map(|_| Consumer::new()).collect();
    let mut time = [Duration::ZERO; 4];
    let mut count = [0u64; 4];
    let mut produce_time = Duration::ZERO;
    let mut produced = 0u64;
    let lost_before = counters.read().lost;
    let mut round = 0u64;
    while count[2] < agent_records {
        for (m, mode) in modes.iter().enumerate() {
            // The floor and the breakdown need fewer samples than the agent's path.
            if matches!(mode, Mode::Drain | Mode::Decode) && !round.is_multiple_of(4) {
                continue;
            }
            let t = Instant::now();
            produced += fill(hooks, &mut gens[m], FILL)?;
            produce_time += t.elapsed();
            let t = Instant::now();
            count[m] += consumers[m].drain(ring, *mode);
            time[m] += t.elapsed();
        }
        round += 1;
    }
    let lost = counters.read().lost - lost_before;
    if lost > 0 {
        bail!("{lost} records lost while filling the ring in bursts of {FILL}; lower FILL");
    }
    let rate = |m: usize| count[m] as f64 / time[m].as_secs_f64().max(1e-9);
    let flows = consumers[2]
        .shared
        .health(true)
        .1
        .detail
        .map_or(0, |d| d.flows.flows);
    eprintln!(
        "  produced {produced} records with test_run at {:.0} rec/s; agent path: {} records, \
         table at {flows} flows",
        produced as f64 / produce_time.as_secs_f64().max(1e-9),
        count[2]
    );
    Ok(vec![
        Row::new(SECTION, "ring drain only (RingBuf::next)", rate(0), "rec/s"),
        Row::new(SECTION, "drain + events::decode", rate(1), "rec/s").baseline(rate(0)),
        Row::new(
            SECTION,
            format!(
                "drain + decode + Shared::ingest, 1 thread ({:.1} M records)",
                count[2] as f64 / 1e6
            ),
            rate(2),
            "rec/s",
        )
        .baseline(rate(0))
        .target(Target::AtLeast(1e6), On::Value, ">= 1M rec/s"),
        Row::new(
            SECTION,
            "drain + decode + FlowTable::ingest, fixed-name lookup (info)",
            rate(3),
            "rec/s",
        )
        .baseline(rate(0)),
    ])
}

fn loss(
    opts: &Opts,
    hooks: &mut Hooks,
    ring: &mut RingBuf<MapData>,
    counters: &KernelCounters,
) -> Result<Vec<Row>> {
    let rates: &[f64] = if opts.quick {
        &[50e3, 200e3, 800e3]
    } else {
        &[50e3, 100e3, 200e3, 400e3, 800e3, 1.6e6]
    };
    let dur = Duration::from_millis(if opts.quick { 500 } else { 2000 });
    let mut gen = Gen::new(8 << 32);
    let mut rows = Vec::new();
    for &rate in rates {
        let mut consumer = Consumer::new();
        let before = counters.read();
        let done = AtomicBool::new(false);
        let produced = AtomicU64::new(0);
        let start = Instant::now();
        let (prod, consumed, consumer_time) = std::thread::scope(|s| {
            let producer = s.spawn(|| {
                let r = produce(hooks, &mut gen, rate, dur, &produced);
                done.store(true, Ordering::Release);
                r
            });
            let (n, t) = consume(ring, &mut consumer, &done);
            (producer.join(), n, t)
        });
        let prod_time = match prod {
            Ok(r) => r?,
            Err(_) => bail!("the producer thread panicked"),
        };
        let after = counters.read();
        let lost = after.lost - before.lost;
        let emitted = after.records - before.records;
        let offered = produced.load(Ordering::Relaxed);
        let achieved = offered as f64 / prod_time.as_secs_f64();
        let ingested = consumed as f64 / consumer_time.max(prod_time).as_secs_f64();
        eprintln!(
            "  rate {:>5.0}k: offered {:>8.0} rec/s, lost {lost}, emitted {emitted}, ingested \
             {consumed} ({:.0} rec/s) in {:.2?}",
            rate / 1e3,
            achieved,
            ingested,
            start.elapsed()
        );
        let mut row = Row::new(
            SECTION,
            format!(
                "lost at {:.0}k rec/s offered (achieved {:.0}k offered, {:.0}k ingested/s; \
                 repeat x{})",
                rate / 1e3,
                achieved / 1e3,
                ingested / 1e3,
                repeat_factor(rate)
            ),
            lost as f64,
            "rec",
        )
        .baseline(offered as f64);
        if rate < 200e3 {
            row = row.target(Target::AtMost(0.0), On::Value, "0 below 200k rec/s");
        }
        rows.push(row);
    }
    Ok(rows)
}

/// A test_run call costs a few microseconds (more while the consumer's wake-ups interrupt it),
/// so above 100k records/s each packet is run `rate / 100k` times as often (repeat).
fn repeat_factor(rate: f64) -> u32 {
    (rate / 100e3).ceil().max(1.0) as u32
}

/// Calls test_run at `rate` records/s for `dur`; returns how long it ran.
fn produce(
    hooks: &mut Hooks,
    gen: &mut Gen,
    rate: f64,
    dur: Duration,
    produced: &AtomicU64,
) -> Result<Duration> {
    let factor = repeat_factor(rate);
    let start = Instant::now();
    let mut n = 0u64;
    loop {
        let now = start.elapsed();
        if now >= dur {
            break;
        }
        // Ahead of schedule: wait until the next record is due.
        let due = Duration::from_secs_f64(n as f64 / rate);
        if due > now {
            let wait = due - now;
            if wait > Duration::from_micros(200) {
                std::thread::sleep(wait - Duration::from_micros(100));
            } else {
                std::hint::spin_loop();
            }
            continue;
        }
        let p = gen.next_pkt();
        let repeat = p.repeat * factor;
        hooks.test_run(p.egress, &workload::frame(&p), repeat)?;
        n += u64::from(repeat);
        produced.store(n, Ordering::Relaxed);
    }
    Ok(start.elapsed())
}

/// The agent's reader: wait for the ring to be readable, drain, decode, ingest per 4096.
/// Returns records consumed and the time until the last one was ingested.
fn consume(
    ring: &mut RingBuf<MapData>,
    consumer: &mut Consumer,
    done: &AtomicBool,
) -> (u64, Duration) {
    let start = Instant::now();
    let mut n = 0u64;
    let mut last = Duration::ZERO;
    loop {
        let finished = done.load(Ordering::Acquire);
        let mut pfd = libc::pollfd {
            fd: ring.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        unsafe { libc::poll(&mut pfd, 1, 10) };
        let got = consumer.drain(ring, Mode::Agent);
        if got > 0 {
            n += got;
            last = start.elapsed();
        } else if finished {
            return (n, last);
        }
    }
}
