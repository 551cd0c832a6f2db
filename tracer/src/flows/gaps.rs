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
    /// The kernel's lost-records counter and when it was last read.
    seen_lost: u64,
    last_look_ns: u64,
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

    /// The reader drained the ring and read the kernel's lost-records counter at `now_ns`:
    /// whatever it grew by since the last look was lost in between.
    pub fn look(&mut self, now_ns: u64, kernel_lost: u64) {
        if kernel_lost > self.seen_lost {
            let start = if self.last_look_ns == 0 {
                0
            } else {
                self.last_look_ns
            };
            self.record_loss(start, now_ns, kernel_lost - self.seen_lost);
            self.seen_lost = kernel_lost;
        }
        self.last_look_ns = now_ns;
        self.drained(now_ns);
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
}
