//! Kernel timestamps (CLOCK_MONOTONIC, from `bpf_ktime_get_ns`) and wall-clock time.
use std::{
    sync::atomic::{AtomicI64, Ordering},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

#[cfg(test)]
thread_local! {
    /// Pins [`mono_now_ns`] on this thread, for tests that compare answers byte for byte.
    pub static FIXED_NOW_NS: std::cell::Cell<Option<u64>> = const { std::cell::Cell::new(None) };
}

/// Nanoseconds on CLOCK_MONOTONIC, the clock `bpf_ktime_get_ns` reads.
pub fn mono_now_ns() -> u64 {
    #[cfg(test)]
    if let Some(now) = FIXED_NOW_NS.with(std::cell::Cell::get) {
        return now;
    }
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer to a timespec; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

fn wall_ns(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_nanos()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_nanos()).unwrap_or(i64::MAX),
    }
}

fn from_wall_ns(ns: i64) -> SystemTime {
    if ns >= 0 {
        UNIX_EPOCH + Duration::from_nanos(ns as u64)
    } else {
        UNIX_EPOCH - Duration::from_nanos(ns.unsigned_abs())
    }
}

/// Converts kernel timestamps to wall-clock time. The offset between the two clocks is
/// re-read by [`Clock::resync`] (the agent does it every tick), so a wall clock that NTP steps
/// after the agent started moves every rendered time and every `since=` with it, instead of
/// leaving them off by the step for the agent's lifetime.
#[derive(Debug)]
pub struct Clock {
    start_ns: u64,
    /// Wall-clock nanoseconds since the epoch minus monotonic nanoseconds.
    offset_ns: AtomicI64,
}

impl Clock {
    pub fn new() -> Clock {
        Clock::anchored(mono_now_ns(), SystemTime::now())
    }

    /// A clock that takes monotonic `mono_ns` to be wall time `wall`.
    pub fn anchored(mono_ns: u64, wall: SystemTime) -> Clock {
        Clock {
            start_ns: mono_ns,
            offset_ns: AtomicI64::new(wall_ns(wall).saturating_sub(mono_ns as i64)),
        }
    }

    /// Re-reads both clocks: follows a wall-clock step.
    pub fn resync(&self) {
        let mono = mono_now_ns();
        let wall = wall_ns(SystemTime::now());
        self.offset_ns
            .store(wall.saturating_sub(mono as i64), Ordering::Relaxed);
    }

    /// When the clock was created (agent start), in monotonic nanoseconds.
    pub fn start_ns(&self) -> u64 {
        self.start_ns
    }

    pub fn wall(&self, ts_ns: u64) -> SystemTime {
        from_wall_ns((ts_ns as i64).saturating_add(self.offset_ns.load(Ordering::Relaxed)))
    }

    pub fn rfc3339(&self, ts_ns: u64) -> String {
        humantime::format_rfc3339_millis(self.wall(ts_ns)).to_string()
    }

    /// Monotonic nanoseconds of a wall-clock time (for `since=` filters).
    pub fn mono_of(&self, wall: SystemTime) -> u64 {
        let mono = wall_ns(wall).saturating_sub(self.offset_ns.load(Ordering::Relaxed));
        mono.max(0) as u64
    }
}

impl Default for Clock {
    fn default() -> Self {
        Clock::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wall_clock_step_after_start_is_followed() {
        // The agent started while the wall clock was an hour behind; NTP has since stepped it.
        let now = mono_now_ns();
        let clock = Clock::anchored(now, SystemTime::now() - Duration::from_secs(3600));
        let off = |c: &Clock| {
            let shown = c.wall(mono_now_ns());
            match SystemTime::now().duration_since(shown) {
                Ok(d) => d,
                Err(e) => e.duration(),
            }
        };
        assert!(off(&clock) > Duration::from_secs(3500));
        clock.resync();
        assert!(
            off(&clock) < Duration::from_secs(1),
            "rendered times follow the step"
        );
        // since= a minute ago means a minute ago in monotonic time too.
        let minute_ago = clock.mono_of(SystemTime::now() - Duration::from_secs(60));
        let want = mono_now_ns().saturating_sub(60_000_000_000);
        assert!(minute_ago.abs_diff(want) < 1_000_000_000);
        // Round trip.
        let t = mono_now_ns();
        assert!(clock.mono_of(clock.wall(t)).abs_diff(t) < 1_000);
    }
}
