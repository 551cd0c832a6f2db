//! The agent's own footprint, for /metrics: resident memory, the allocator's view of the heap and
//! the kernel objects it holds. A leak shows on a dashboard as a rising line here long before the
//! DaemonSet's memory limit kills the pod.

/// What the process holds right now.
#[derive(Debug, Default, Clone, Copy)]
pub struct Footprint {
    /// Resident set size (`/proc/self/statm`), bytes.
    pub rss_bytes: u64,
    /// Heap bytes handed out by malloc and not freed (glibc `mallinfo2`); None elsewhere.
    pub heap_bytes: Option<u64>,
    /// Bytes malloc keeps but are free (fragmentation and not-yet-trimmed tops); None elsewhere.
    pub heap_free_bytes: Option<u64>,
    /// BPF link objects (one per tc attachment under TCX) the process holds open.
    pub bpf_links: u64,
    /// Open file descriptors.
    pub fds: u64,
    /// User plus system CPU time of the process so far (`/proc/self/stat`), seconds.
    pub cpu_seconds: Option<f64>,
}

impl Footprint {
    pub fn now() -> Footprint {
        let (heap_bytes, heap_free_bytes) = match heap() {
            Some((used, free)) => (Some(used), Some(free)),
            None => (None, None),
        };
        let (fds, bpf_links) = fds();
        Footprint {
            rss_bytes: rss_bytes().unwrap_or(0),
            heap_bytes,
            heap_free_bytes,
            bpf_links,
            fds,
            cpu_seconds: cpu_seconds(),
        }
    }
}

/// Resident set size of this process.
pub fn rss_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages * u64::try_from(page).ok().filter(|p| *p > 0).unwrap_or(4096))
}

/// utime + stime of this process, in seconds.
pub fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which may hold spaces) start at state, field 3.
    let rest = stat.get(stat.rfind(')')? + 1..)?;
    let mut f = rest.split_whitespace().skip(11);
    let utime: u64 = f.next()?.parse().ok()?;
    let stime: u64 = f.next()?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let hz = u64::try_from(hz).ok().filter(|h| *h > 0)?;
    Some((utime + stime) as f64 / hz as f64)
}

/// (in use, free but kept) heap bytes according to glibc's malloc, over all arenas.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn heap() -> Option<(u64, u64)> {
    // SAFETY: mallinfo2 only reads the allocator's statistics (under its arena locks).
    let m = unsafe { libc::mallinfo2() };
    // uordblks: in use from the arenas; hblkhd: large blocks mmap'ed on their own (in use).
    // fordblks: free bytes inside the arenas.
    Some(((m.uordblks + m.hblkhd) as u64, m.fordblks as u64))
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn heap() -> Option<(u64, u64)> {
    None
}

/// Hands the free pages malloc keeps back to the system (glibc `malloc_trim`): every arena's
/// top and the whole free pages inside it. Freed memory otherwise stays resident in the arena of
/// whichever thread allocated it, and a burst of interface changes (each a netlink dump of
/// every link, parsed) leaves tens of MiB free but resident. Returns the bytes RSS shrank by.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn release_free_heap() -> u64 {
    let before = rss_bytes().unwrap_or(0);
    // SAFETY: malloc_trim only returns free memory; no pointer handed out is affected.
    unsafe { libc::malloc_trim(0) };
    before.saturating_sub(rss_bytes().unwrap_or(before))
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn release_free_heap() -> u64 {
    0
}

/// (open fds, of which BPF links).
fn fds() -> (u64, u64) {
    let mut n = 0;
    let mut links = 0;
    for t in crate::own_sockets::fd_targets() {
        n += 1;
        if t.is_some_and(|t| t.as_os_str() == "anon_inode:bpf_link") {
            links += 1;
        }
    }
    (n, links)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_its_own_process() {
        let f = Footprint::now();
        assert!(f.rss_bytes > 0, "{f:?}");
        assert!(f.fds >= 3, "{f:?}");
        assert_eq!(f.bpf_links, 0);
        #[cfg(target_env = "gnu")]
        {
            let v = vec![1u8; 4 << 20];
            let during = Footprint::now().heap_bytes.unwrap_or(0);
            assert!(during >= 4 << 20, "{during}");
            drop(v);
            let _ = release_free_heap();
        }
    }
}
