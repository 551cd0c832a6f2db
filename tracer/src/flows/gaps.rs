//! Where the evidence has holes: records the kernel could not hand over (ring buffer full) and
//! how far the reader has got. A flow whose lifetime overlaps a hole may be missing the very
//! record that would clear it (its reply), so the rules must not call it unanswered.
use std::collections::VecDeque;

use serde::Serialize;

/// Loss windows kept; older ones merge into the oldest kept, so the total stays exact.
const WINDOWS: usize = 64;

/// Records lost between two looks at the kernel's counter: their packets crossed a hook in
/// `(start_ns, end_ns]` (monotonic).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct LossWindow {
    pub start_ns: u64,
    pub end_ns: u64,
    pub lost: u64,
}

#[derive(Debug, Default, Clone)]
pub struct Gaps {
    windows: VecDeque<LossWindow>,
    total_lost: u64,
    /// The reader had consumed everything the kernel wrote up to this time (monotonic ns); 0
    /// until the first look.
    drained_ns: u64,
    /// The kernel's lost-records counter, and when its last read began.
    seen_lost: u64,
    last_read_start_ns: u64,
}

/// One read of the kernel's lost-records counter, with the clock just before and just after it.
/// Both ends matter: a record lost while the reader was busy between the two is counted by
/// this read, so its window must reach to the read's end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CounterRead {
    pub lost: u64,
    pub start_ns: u64,
    pub end_ns: u64,
}

impl CounterRead {
    /// A read that took no time (fixtures).
    pub fn at(ns: u64, lost: u64) -> Self {
        CounterRead {
            lost,
            start_ns: ns,
            end_ns: ns,
        }
    }
}

impl Gaps {
    /// The kernel dropped `lost` records between `start_ns` and `end_ns`.
    pub fn record_loss(&mut self, start_ns: u64, end_ns: u64, lost: u64) {
        if lost == 0 {
            return;
        }
        self.total_lost += lost;
        if let Some(last) = self.windows.back_mut() {
            // Back-to-back losses (a sustained overload) are one window.
            if start_ns <= last.end_ns {
                last.end_ns = last.end_ns.max(end_ns);
                last.lost += lost;
                return;
            }
        }
        if self.windows.len() == WINDOWS {
            if let (Some(first), Some(second)) =
                (self.windows.pop_front(), self.windows.front_mut())
            {
                second.start_ns = first.start_ns;
                second.lost += first.lost;
            }
        }
        self.windows.push_back(LossWindow {
            start_ns,
            end_ns,
            lost,
        });
    }

    /// The reader emptied the ring at `drained_ns` and then read the kernel's lost-records
    /// counter: whatever it grew by since the previous read was lost after that read began and
    /// before this one ended.
    pub fn look(&mut self, drained_ns: u64, read: CounterRead) {
        if read.lost > self.seen_lost {
            self.record_loss(
                self.last_read_start_ns,
                read.end_ns,
                read.lost - self.seen_lost,
            );
            self.seen_lost = read.lost;
        }
        self.last_read_start_ns = read.start_ns;
        self.drained(drained_ns);
    }

    /// The reader found the ring empty at `now_ns`.
    pub fn drained(&mut self, now_ns: u64) {
        self.drained_ns = self.drained_ns.max(now_ns);
    }

    /// Up to when every record the kernel wrote has been read; None before the reader ran (then
    /// nothing limits how far the rules may look).
    pub fn drained_ns(&self) -> Option<u64> {
        (self.drained_ns > 0).then_some(self.drained_ns)
    }

    /// Records lost while `[from_ns, to_ns]` ran.
    pub fn lost_between(&self, from_ns: u64, to_ns: u64) -> u64 {
        self.windows
            .iter()
            .filter(|w| w.end_ns >= from_ns && w.start_ns <= to_ns)
            .map(|w| w.lost)
            .sum()
    }

    pub fn total_lost(&self) -> u64 {
        self.total_lost
    }

    pub fn windows(&self) -> impl Iterator<Item = &LossWindow> {
        self.windows.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlapping_flows_see_losses_and_totals_stay_exact() {
        let mut g = Gaps::default();
        g.record_loss(100, 200, 5);
        g.record_loss(150, 300, 2); // merges
        g.record_loss(1_000, 1_100, 1);
        assert_eq!(g.windows().count(), 2);
        assert_eq!(g.lost_between(0, 99), 0);
        assert_eq!(g.lost_between(250, 260), 7);
        assert_eq!(g.lost_between(0, 2_000), 8);
        assert_eq!(g.lost_between(301, 999), 0);
        for i in 0..200u64 {
            g.record_loss(10_000 + i * 10, 10_005 + i * 10, 1);
        }
        assert_eq!(g.windows().count(), WINDOWS);
        assert_eq!(g.total_lost(), 208);
        assert_eq!(
            g.lost_between(0, u64::MAX),
            208,
            "merged windows keep their counts"
        );
        assert_eq!(g.drained_ns(), None);
        g.drained(50);
        g.drained(40);
        assert_eq!(g.drained_ns(), Some(50));
    }

    #[test]
    fn a_loss_counted_by_a_slow_read_covers_the_whole_read() {
        let mut g = Gaps::default();
        // The first read: nothing lost yet.
        g.look(
            100,
            CounterRead {
                lost: 0,
                start_ns: 110,
                end_ns: 120,
            },
        );
        // The reader drained at 1_000 but was busy (a batch to ingest, a lock) until it read the
        // counter at 5_000..5_010: a record lost at 4_000 is counted by this read.
        g.look(
            1_000,
            CounterRead {
                lost: 3,
                start_ns: 5_000,
                end_ns: 5_010,
            },
        );
        assert_eq!(g.lost_between(4_000, 4_500), 3, "{:?}", g.windows);
        assert_eq!(
            g.lost_between(111, 111),
            3,
            "the previous read may have just missed it"
        );
        assert_eq!(g.lost_between(0, 109), 0);
        assert_eq!(g.drained_ns(), Some(1_000));
        // The next window starts where this read began.
        g.look(
            6_000,
            CounterRead {
                lost: 4,
                start_ns: 6_100,
                end_ns: 6_110,
            },
        );
        assert_eq!(
            g.lost_between(5_005, 5_005),
            4,
            "the windows overlap, so they merge"
        );
        assert_eq!(g.windows().count(), 1);
        assert_eq!(g.total_lost(), 4);
    }
}
