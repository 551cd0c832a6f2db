//! Liveness evidence: the ring reader and the sync loop say when they last made progress, and
//! `/healthz` fails (503) when either has died or stopped, so that the kubelet restarts the agent.
use std::{
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
    time::Duration,
};

pub use tracer_model::health::{Checks, ReaderCheck, SyncCheck};
use tracer_model::{
    health::{HealthDetail, Status},
    Health, Readiness,
};

use super::{lock, Shared};
use crate::clock::mono_now_ns;

/// The reader wakes at least this often, records or not: an idle reader still beats.
pub const READER_WAKE: Duration = Duration::from_millis(250);
/// A reader that has not woken for this long is stuck (a wake is 250 ms; a table hold by the API
/// is a few ms): not idle, stalled.
pub const READER_STALL_AFTER: Duration = Duration::from_secs(5);
/// Node syncs run every `--resync` (10 s) and on every netlink change; with no completed sync
/// for this many resync periods (and at least [`SYNC_STUCK_MIN`]) the sync loop is stuck.
const SYNC_STUCK_PERIODS: u32 = 6;
const SYNC_STUCK_MIN: Duration = Duration::from_secs(60);

/// A fault the agent injects into itself on purpose, for the tests of `/healthz` only.
///
/// TEST HOOK: set through the environment variable `TRACER_TEST_FAULT` (read once at start):
/// `reader-exits` (the ring reader returns at once, as if polling failed), `reader-stalls` (it
/// stops waking up), `sync-stuck` (node syncs stop completing after the first) or
/// `kernel-unsupported` (loading the programs fails as on a kernel older than 5.11). Never set
/// it on a real node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    ReaderExits,
    ReaderStalls,
    SyncStuck,
    KernelUnsupported,
}

pub const FAULT_ENV: &str = "TRACER_TEST_FAULT";

impl Fault {
    pub fn from_env() -> Option<Fault> {
        let v = std::env::var(FAULT_ENV).ok()?;
        let f = match v.as_str() {
            "reader-exits" => Fault::ReaderExits,
            "reader-stalls" => Fault::ReaderStalls,
            "sync-stuck" => Fault::SyncStuck,
            "kernel-unsupported" => Fault::KernelUnsupported,
            other => {
                tracing::warn!(value = other, "unknown {FAULT_ENV}; ignored");
                return None;
            }
        };
        tracing::warn!(fault = ?f, "{FAULT_ENV} is set: injecting a fault for a test");
        Some(f)
    }
}

/// Progress stamps (monotonic ns, 0 = never), written by the reader and the sync loop.
#[derive(Debug, Default)]
pub struct Liveness {
    /// The programs could not be loaded on this kernel: the agent stays up to say so instead of
    /// failing its probes into a restart loop.
    unsupported: AtomicBool,
    reader_started: AtomicBool,
    reader_exited: AtomicBool,
    reader_beat_ns: AtomicU64,
    sync_done_ns: AtomicU64,
}

impl Liveness {
    pub fn reader_beat(&self, now_ns: u64) {
        self.reader_started.store(true, Ordering::Relaxed);
        self.reader_beat_ns.store(now_ns, Ordering::Relaxed);
    }

    pub fn set_unsupported(&self) {
        self.unsupported.store(true, Ordering::Relaxed);
    }

    pub fn unsupported(&self) -> bool {
        self.unsupported.load(Ordering::Relaxed)
    }

    pub fn reader_exited(&self) {
        self.reader_exited.store(true, Ordering::Relaxed);
    }

    pub fn sync_done(&self, now_ns: u64) {
        self.sync_done_ns.store(now_ns, Ordering::Relaxed);
    }

    /// Milliseconds since the reader last woke, if it ever did.
    pub fn reader_idle_ms(&self, now_ns: u64) -> Option<u64> {
        let b = self.reader_beat_ns.load(Ordering::Relaxed);
        (b > 0).then(|| now_ns.saturating_sub(b) / 1_000_000)
    }

    /// Milliseconds since the last completed node sync, if one ever completed.
    pub fn sync_age_ms(&self, now_ns: u64) -> Option<u64> {
        let s = self.sync_done_ns.load(Ordering::Relaxed);
        (s > 0).then(|| now_ns.saturating_sub(s) / 1_000_000)
    }

    pub fn checks(&self, now_ns: u64, start_ns: u64, resync: Duration) -> Checks {
        if self.unsupported() {
            // Nothing runs, by decision: a restart would not change the kernel.
            return Checks {
                reader: ReaderCheck::Unsupported,
                node_sync: SyncCheck::Unsupported,
            };
        }
        checks(
            Stamps {
                reader_started: self.reader_started.load(Ordering::Relaxed),
                reader_exited: self.reader_exited.load(Ordering::Relaxed),
                reader_beat_ns: self.reader_beat_ns.load(Ordering::Relaxed),
                sync_done_ns: self.sync_done_ns.load(Ordering::Relaxed),
            },
            now_ns,
            start_ns,
            resync,
        )
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct Stamps {
    reader_started: bool,
    reader_exited: bool,
    reader_beat_ns: u64,
    sync_done_ns: u64,
}

fn checks(s: Stamps, now_ns: u64, start_ns: u64, resync: Duration) -> Checks {
    let ns = |d: Duration| d.as_nanos() as u64;
    let reader = if s.reader_exited {
        ReaderCheck::Stopped
    } else if !s.reader_started {
        // Started before the API serves; a reader that never beats is as stuck as one that stops.
        if now_ns.saturating_sub(start_ns) > ns(READER_STALL_AFTER) {
            ReaderCheck::Stalled
        } else {
            ReaderCheck::Starting
        }
    } else if now_ns.saturating_sub(s.reader_beat_ns) > ns(READER_STALL_AFTER) {
        ReaderCheck::Stalled
    } else {
        ReaderCheck::Ok
    };
    let stuck_after = (resync * SYNC_STUCK_PERIODS).max(SYNC_STUCK_MIN);
    let since = if s.sync_done_ns > 0 {
        s.sync_done_ns
    } else {
        start_ns
    };
    let node_sync = if now_ns.saturating_sub(since) > ns(stuck_after) {
        SyncCheck::Stuck
    } else if s.sync_done_ns == 0 {
        SyncCheck::Starting
    } else {
        SyncCheck::Ok
    };
    Checks { reader, node_sync }
}

impl Shared {
    /// Whether the reader and the sync loop are alive, judged now.
    pub fn checks(&self) -> tracer_model::health::Checks {
        self.liveness
            .checks(mono_now_ns(), self.clock.start_ns(), self.resync)
    }

    /// Ready once the programs are loaded and the first interface sync is done, while healthy.
    /// `detail` (authorized callers only) adds what is attached and whether drops are traced.
    pub fn readiness(&self, detail: bool) -> Readiness {
        let healthy = !self.checks().failing();
        let node = self.node();
        Readiness {
            ready: node.ready && healthy,
            attached: detail.then_some(node.attached.len()),
            drops: detail.then(|| node.drops.clone()),
        }
    }

    /// `/healthz`: healthy (false: answer 503) and the body. Without `detail` (callers without
    /// the token) the body holds fixed words only: no interface names (they tell which pod runs
    /// where), no pools, no error text.
    pub fn health(&self, detail: bool) -> (bool, Health) {
        let checks = self.checks();
        let now = mono_now_ns();
        let node = self.node();
        let status = if node.unsupported.is_some() {
            Status::Unsupported
        } else if checks.failing() {
            Status::Failing
        } else if node.ready {
            Status::Ok
        } else {
            Status::Starting
        };
        let detail = detail.then(|| {
            // Before the literal below: it holds the table's lock to its end.
            let flow_log = self.flow_log_stats();
            let reader = *lock(&self.reader);
            HealthDetail {
                tc: node.tc,
                drops: node.drops.clone(),
                attached: node.attached.clone(),
                pools: (&node.pools).into(),
                ebpf_dataplane: node.pools.ebpf.as_ref().map(Into::into),
                kernel: self.kernel(),
                reader: tracer_model::health::ReaderStats {
                    records: reader.records,
                    decode_errors: reader.decode_errors,
                    idle_ms: self.liveness.reader_idle_ms(now),
                },
                node_sync_age_ms: self.liveness.sync_age_ms(now),
                flows: lock(&self.table).stats(),
                api: self.api.snapshot(),
                uptime_s: Duration::from_nanos(now.saturating_sub(self.clock.start_ns())).as_secs(),
                identity: self.identities().health(),
                flow_log,
            }
        });
        let health = Health {
            status,
            ready: node.ready,
            checks,
            unsupported: detail.as_ref().and(node.unsupported.clone()),
            turned_off: node
                .pools
                .ebpf
                .as_ref()
                .map(|_| crate::felix_bpf::turned_off())
                .unwrap_or_default(),
            detail,
        };
        (!checks.failing(), health)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;
    const RESYNC: Duration = Duration::from_secs(10);

    fn at(s: Stamps, now_s: u64) -> Checks {
        checks(s, now_s * S, S, RESYNC)
    }

    #[test]
    fn an_idle_reader_is_healthy_a_silent_one_is_not() {
        let beating = Stamps {
            reader_started: true,
            reader_beat_ns: 100 * S,
            sync_done_ns: 95 * S,
            ..Stamps::default()
        };
        assert_eq!(
            at(beating, 101),
            Checks {
                reader: ReaderCheck::Ok,
                node_sync: SyncCheck::Ok
            }
        );
        assert!(!at(beating, 101).failing());
        // No beat for over 5 s: stalled, whatever the traffic.
        assert_eq!(at(beating, 106).reader, ReaderCheck::Stalled);
        assert!(at(beating, 106).failing());
        let exited = Stamps {
            reader_exited: true,
            ..beating
        };
        assert_eq!(at(exited, 100).reader, ReaderCheck::Stopped);
        assert!(at(exited, 100).failing());
    }

    #[test]
    fn startup_is_not_failure_until_it_takes_too_long() {
        let fresh = Stamps::default();
        assert_eq!(
            at(fresh, 2),
            Checks {
                reader: ReaderCheck::Starting,
                node_sync: SyncCheck::Starting
            }
        );
        assert!(!at(fresh, 2).failing());
        assert_eq!(at(fresh, 10).reader, ReaderCheck::Stalled);
        assert_eq!(at(fresh, 62).node_sync, SyncCheck::Stuck);
    }

    #[test]
    fn a_sync_loop_that_stops_completing_is_stuck() {
        let s = Stamps {
            reader_started: true,
            reader_beat_ns: 200 * S,
            sync_done_ns: 100 * S,
            ..Stamps::default()
        };
        assert_eq!(at(s, 159).node_sync, SyncCheck::Ok);
        assert_eq!(at(s, 161).node_sync, SyncCheck::Stuck);
        // A long --resync stretches the budget.
        assert_eq!(
            checks(s, 250 * S, S, Duration::from_secs(30)).node_sync,
            SyncCheck::Ok
        );
    }
}
