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

/// Writes the 24 bytes straight from the nanosecond count: every flow view formats two
/// timestamps, and going through `Display` and `to_string` cost more than the arithmetic.
/// Times before 1970 keep humantime's own behaviour (`wall` gives the time); an `i64` of
/// nanoseconds ends in 2262, inside humantime's range.
fn rfc3339_millis(ns: i64, wall: impl FnOnce() -> SystemTime) -> String {
    if ns < 0 {
        return humantime::format_rfc3339_millis(wall()).to_string();
    }
    let (secs, millis) = (ns / 1_000_000_000, ns % 1_000_000_000 / 1_000_000);
    let (days, sod) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's days_from_civil inverse).
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let mut buf = *b"0000-00-00T00:00:00.000Z";
    let mut put = |at: usize, width: usize, mut v: i64| {
        for i in (at..at + width).rev() {
            buf[i] = b'0' + (v % 10) as u8;
            v /= 10;
        }
    };
    put(0, 4, year);
    put(5, 2, month);
    put(8, 2, day);
    put(11, 2, sod / 3_600);
    put(14, 2, sod / 60 % 60);
    put(17, 2, sod % 60);
    put(20, 3, millis);
    // All ASCII digits and separators: the UTF-8 check is its ASCII fast path.
    std::str::from_utf8(&buf)
        .map(String::from)
        .unwrap_or_default()
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

    /// Wall-clock nanoseconds since the epoch of monotonic `ts_ns`.
    fn wall_ns_of(&self, ts_ns: u64) -> i64 {
        (ts_ns as i64).saturating_add(self.offset_ns.load(Ordering::Relaxed))
    }

    pub fn wall(&self, ts_ns: u64) -> SystemTime {
        from_wall_ns(self.wall_ns_of(ts_ns))
    }

    /// `YYYY-MM-DDTHH:MM:SS.mmmZ`, the bytes of `humantime::format_rfc3339_millis`.
    pub fn rfc3339(&self, ts_ns: u64) -> String {
        let ns = self.wall_ns_of(ts_ns);
        rfc3339_millis(ns, || from_wall_ns(ns))
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

    proptest::proptest! {
        #[test]
        fn rfc3339_writes_humantimes_bytes(ns in 0_i64..i64::MAX) {
            let clock = Clock::anchored(0, UNIX_EPOCH);
            let ours = clock.rfc3339(ns as u64);
            let theirs = humantime::format_rfc3339_millis(clock.wall(ns as u64)).to_string();
            proptest::prop_assert_eq!(ours, theirs);
        }
    }

    #[test]
    fn rfc3339_at_the_edges() {
        let clock = Clock::anchored(0, UNIX_EPOCH);
        for ns in [
            0,
            999_999,
            951_782_400_000_000_000,
            4_107_542_399_999_000_000,
            i64::MAX as u64,
        ] {
            assert_eq!(
                clock.rfc3339(ns),
                humantime::format_rfc3339_millis(clock.wall(ns)).to_string()
            );
        }
    }

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
