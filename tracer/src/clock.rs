//! Kernel timestamps (CLOCK_MONOTONIC, from `bpf_ktime_get_ns`) and wall-clock time.
use std::time::{Duration, SystemTime};

/// Nanoseconds on CLOCK_MONOTONIC, the clock `bpf_ktime_get_ns` reads.
pub fn mono_now_ns() -> u64 {
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

/// Converts kernel timestamps to wall-clock time.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    mono_ns: u64,
    wall: SystemTime,
}

impl Clock {
    pub fn new() -> Clock {
        Clock {
            mono_ns: mono_now_ns(),
            wall: SystemTime::now(),
        }
    }

    /// When the clock was created (agent start), in monotonic nanoseconds.
    pub fn start_ns(&self) -> u64 {
        self.mono_ns
    }

    pub fn wall(&self, ts_ns: u64) -> SystemTime {
        if ts_ns >= self.mono_ns {
            self.wall + Duration::from_nanos(ts_ns - self.mono_ns)
        } else {
            self.wall - Duration::from_nanos(self.mono_ns - ts_ns)
        }
    }

    pub fn rfc3339(&self, ts_ns: u64) -> String {
        humantime::format_rfc3339_millis(self.wall(ts_ns)).to_string()
    }

    /// Monotonic nanoseconds of a wall-clock time (for `since=` filters).
    pub fn mono_of(&self, wall: SystemTime) -> u64 {
        match wall.duration_since(self.wall) {
            Ok(d) => self.mono_ns.saturating_add(d.as_nanos() as u64),
            Err(e) => self.mono_ns.saturating_sub(e.duration().as_nanos() as u64),
        }
    }
}

impl Default for Clock {
    fn default() -> Self {
        Clock::new()
    }
}
