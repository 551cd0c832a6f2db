//! The node's conntrack counters, for `snat_port_exhaustion`.
//!
//! `/proc/net/stat/nf_conntrack` holds one row of hex counters per CPU for the reader's network
//! namespace (the agent runs in the host's); `insert_failed` and `drop` move when a new
//! connection cannot be confirmed because its tuple, after source NAT, clashes with one already
//! in the table: with a narrow `--to-ports` range and many short connections to one destination
//! every port is held (TIME_WAIT included) and the SYN is dropped. The agent reads them on a
//! timer, never per packet (`agent::read_conntrack_stats`), and keeps the readings at which they
//! changed, so a flow's interval can be asked for later.
use std::collections::VecDeque;

use tracer_model::diagnosis::ConntrackMoved;

const STAT: &str = "/proc/net/stat/nf_conntrack";
const COUNT: &str = "/proc/sys/net/netfilter/nf_conntrack_count";
const MAX: &str = "/proc/sys/net/netfilter/nf_conntrack_max";

/// How often the agent reads the counters: a flow's interval is extended by this much, so the
/// reading after its last packet is in it.
pub const READ_EVERY: std::time::Duration = std::time::Duration::from_millis(250);

/// Change points kept: at one per reading (4 a second) while counters move, about a minute of a
/// storm; older flows are then said to be unreadable.
const KEPT: usize = 256;

/// The counters the cause reports, summed over CPUs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    pub insert_failed: u64,
    pub drop: u64,
    pub early_drop: u64,
    pub clash_resolve: u64,
    pub search_restart: u64,
}

/// One reading: the counters and the table's fill.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    pub counters: Counters,
    pub count: u64,
    pub max: u64,
}

/// A reading for tests: `insert_failed` clashes (each a drop), 2 of 262144 entries in use.
#[cfg(test)]
pub(crate) fn test_stats(insert_failed: u64) -> Result<Stats, String> {
    Ok(Stats {
        counters: Counters {
            insert_failed,
            drop: insert_failed,
            ..Counters::default()
        },
        count: 2,
        max: 262144,
    })
}

/// Sums `/proc/net/stat/nf_conntrack`'s per-CPU rows by column name. A column this kernel does
/// not have (`clashres` came in 5.8, `search_restart` in 4.19) reads as 0; the two the cause
/// rests on must be there.
pub fn parse_stat(text: &str) -> Result<Counters, String> {
    let mut lines = text.lines();
    let head: Vec<&str> = lines.next().ok_or("empty")?.split_whitespace().collect();
    let col = |name: &str| head.iter().position(|h| *h == name);
    let (Some(insert_failed), Some(drop)) = (col("insert_failed"), col("drop")) else {
        return Err(format!("no insert_failed/drop columns in {STAT}"));
    };
    let cols = [
        Some(insert_failed),
        Some(drop),
        col("early_drop"),
        col("clashres"),
        col("search_restart"),
    ];
    let mut sums = [0u64; 5];
    for line in lines.filter(|l| !l.trim().is_empty()) {
        let row: Vec<&str> = line.split_whitespace().collect();
        if row.len() != head.len() {
            return Err(format!(
                "a row of {} columns under {}",
                row.len(),
                head.len()
            ));
        }
        for (sum, c) in sums.iter_mut().zip(cols) {
            if let Some(c) = c {
                let v = u64::from_str_radix(row[c], 16)
                    .map_err(|_| format!("not a hex counter: {:?}", row[c]))?;
                *sum = sum.saturating_add(v);
            }
        }
    }
    let [insert_failed, drop, early_drop, clash_resolve, search_restart] = sums;
    Ok(Counters {
        insert_failed,
        drop,
        early_drop,
        clash_resolve,
        search_restart,
    })
}

fn read_number(path: &str) -> Result<u64, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{path}: {e}"))?;
    text.trim()
        .parse()
        .map_err(|_| format!("{path}: not a number"))
}

/// Reads the agent's own namespace's counters. Fails when conntrack is not loaded (no file).
pub fn read() -> Result<Stats, String> {
    let text = std::fs::read_to_string(STAT).map_err(|e| format!("{STAT}: {e}"))?;
    Ok(Stats {
        counters: parse_stat(&text).map_err(|e| format!("{STAT}: {e}"))?,
        count: read_number(COUNT)?,
        max: read_number(MAX)?,
    })
}

/// The readings so far: the ones at which the counters changed, the latest, and the last error.
#[derive(Debug, Clone, Default)]
pub struct Readings {
    /// (time, counters) whenever they differed from the previous reading; oldest first.
    changes: VecDeque<(u64, Counters)>,
    /// The time of the newest change point dropped to stay within [`KEPT`].
    forgotten_until: Option<u64>,
    /// The latest successful reading and its time.
    latest: Option<(u64, Stats)>,
    /// Why the latest reading failed, if it did.
    pub error: Option<String>,
}

impl Readings {
    /// A reading taken at `at_ns`.
    pub fn record(&mut self, at_ns: u64, read: Result<Stats, String>) {
        let stats = match read {
            Ok(s) => s,
            Err(e) => {
                self.error = Some(e);
                return;
            }
        };
        self.error = None;
        if self.changes.back().map(|(_, c)| *c) != Some(stats.counters) {
            if self.changes.len() == KEPT {
                self.forgotten_until = self.changes.pop_front().map(|(t, _)| t);
            }
            self.changes.push_back((at_ns, stats.counters));
        }
        self.latest = Some((at_ns, stats));
    }

    /// The counters as of `t`: the last change point at or before it, or the first reading
    /// when `t` precedes every reading (nothing is known to have moved before it).
    fn at(&self, t: u64) -> Option<Counters> {
        let before = self.changes.iter().rev().find(|(at, _)| *at <= t);
        before.or(self.changes.front()).map(|(_, c)| *c)
    }

    /// How the counters moved between the readings around `[from_ns, to_ns]`: from the
    /// reading at or before `from_ns` to the latest one at or before `to_ns` (the caller adds
    /// the reader's period). `Ok(None)` while no reading after `from_ns` exists yet; `Err`
    /// says why the interval cannot be read.
    pub fn moved(&self, from_ns: u64, to_ns: u64) -> Result<Option<ConntrackMoved>, String> {
        let Some((last_ns, latest)) = self.latest else {
            return Err(self
                .error
                .clone()
                .unwrap_or_else(|| "conntrack counters not read yet".into()));
        };
        if self.forgotten_until.is_some_and(|f| from_ns <= f) {
            return Err(format!(
                "conntrack readings before the flow's start are no longer kept (the last {KEPT} changes are)"
            ));
        }
        let to_ns = to_ns.min(last_ns);
        if to_ns <= from_ns {
            return Ok(None);
        }
        let (Some(a), Some(b)) = (self.at(from_ns), self.at(to_ns)) else {
            return Ok(None);
        };
        let from_at = self
            .changes
            .iter()
            .rev()
            .find(|(at, _)| *at <= from_ns)
            .map_or(from_ns, |(at, _)| *at);
        Ok(Some(ConntrackMoved {
            clash_resolve: b.clash_resolve.saturating_sub(a.clash_resolve),
            count: latest.count,
            drop: b.drop.saturating_sub(a.drop),
            early_drop: b.early_drop.saturating_sub(a.early_drop),
            interval_ms: to_ns.saturating_sub(from_at) / 1_000_000,
            insert_failed: b.insert_failed.saturating_sub(a.insert_failed),
            max: latest.max,
            search_restart: b.search_restart.saturating_sub(a.search_restart),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two CPUs of a 6.18 kernel after three SYNs found no free SNAT port.
    const STAT_TEXT: &str = "entries  clashres found new invalid ignore delete chainlength insert insert_failed drop early_drop icmp_error  expect_new expect_create expect_delete search_restart
00000002  00000000 00000000 00000000 00000000 00000000 00000000 00000000 00000000 00000002 00000002 00000000 00000000  00000000 00000000 00000000 00000001
00000002  00000000 00000000 00000000 00000000 00000000 00000000 00000000 00000000 00000001 00000001 00000000 00000000  00000000 00000000 00000000 00000000
";

    #[test]
    fn sums_cpus_by_column() {
        let c = parse_stat(STAT_TEXT).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            c,
            Counters {
                insert_failed: 3,
                drop: 3,
                early_drop: 0,
                clash_resolve: 0,
                search_restart: 1
            }
        );
        assert!(parse_stat("entries found\n00 00\n").is_err());
        assert!(parse_stat("insert_failed drop\n0z 00\n").is_err());
        assert!(parse_stat("insert_failed drop\n00\n").is_err());
        assert!(parse_stat("").is_err());
    }

    #[test]
    fn moves_between_readings_around_the_interval() {
        let mut r = Readings::default();
        assert!(r.moved(0, 10).is_err(), "nothing read: said");
        r.record(100, test_stats(5));
        r.record(200, test_stats(5));
        r.record(300, test_stats(8));
        r.record(400, test_stats(8));
        let m = |a, b| r.moved(a, b).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(m(150, 450).map(|m| m.insert_failed), Some(3));
        assert_eq!(m(150, 250).map(|m| m.insert_failed), Some(0));
        assert_eq!(m(310, 400).map(|m| m.insert_failed), Some(0));
        // Not read past the start yet.
        assert_eq!(m(450, 900), None);
        r.record(500, Err("gone".into()));
        assert_eq!(r.error.as_deref(), Some("gone"));
        // A failed reading keeps what was read before.
        let kept = r.moved(150, 900).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(kept.map(|m| (m.insert_failed, m.max)), Some((3, 262144)));
    }

    #[test]
    fn forgotten_readings_are_said() {
        let mut r = Readings::default();
        for i in 0..(KEPT as u64 + 2) {
            r.record(i * 10, test_stats(i));
        }
        assert!(r.moved(5, 100).is_err());
        assert_eq!(
            r.moved(100, 200)
                .unwrap_or_else(|e| panic!("{e}"))
                .map(|m| m.insert_failed),
            Some(10)
        );
    }
}
