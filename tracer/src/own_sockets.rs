//! The agent's own TCP connections (its datastore watch, API clients), so that tracer never
//! diagnoses itself: a watch is a request answered whenever the datastore next changes, which
//! would read as a slow datastore exchange.
//!
//! Read on the node sync: getsockname(2) on the agent's own socket fds (listed in
//! `/proc/self/fd`), the TCP ones. Not `/proc/self/net/tcp`: reading it makes the kernel walk
//! the whole TCP hash, shared by every namespace (on a busy node hundreds of thousands of the
//! pods' TIME_WAIT sockets) to find the agent's few. Anything unreadable gives fewer entries,
//! never an error: the set only ever removes the agent's own flows from judgement.
use std::{
    collections::HashSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::RawFd,
    path::PathBuf,
};

/// Local addresses of the agent's own TCP sockets.
pub fn read() -> HashSet<SocketAddr> {
    socket_fds().filter_map(tcp_local).collect()
}

/// What each of the agent's open file descriptors refers to (`None`: unreadable, closed since
/// the listing began); empty when `/proc/self/fd` cannot be read. Also counts fds and BPF links
/// for the footprint.
pub fn fd_targets() -> impl Iterator<Item = Option<PathBuf>> {
    std::fs::read_dir("/proc/self/fd")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| std::fs::read_link(e.path()).ok())
}

/// The agent's fds that are sockets. One closed and reused since the listing is still one of
/// the agent's own.
fn socket_fds() -> impl Iterator<Item = RawFd> {
    std::fs::read_dir("/proc/self/fd")
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            std::fs::read_link(e.path())
                .is_ok_and(|l| l.to_str().is_some_and(|l| l.starts_with("socket:[")))
        })
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
}

/// The local address of `fd` if it is a TCP socket (IPv4 or IPv6).
fn tcp_local(fd: RawFd) -> Option<SocketAddr> {
    let mut proto: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `proto` is a c_int and `len` its size; a bad or non-socket fd only fails.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_PROTOCOL,
            (&mut proto as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if r != 0 || proto != libc::IPPROTO_TCP {
        return None;
    }
    // SAFETY: all-zero is a valid sockaddr_storage.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: `ss` is large enough for any address and `len` says so.
    let r = unsafe {
        libc::getsockname(
            fd,
            (&mut ss as *mut libc::sockaddr_storage).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return None;
    }
    match libc::c_int::from(ss.ss_family) {
        libc::AF_INET if len as usize >= std::mem::size_of::<libc::sockaddr_in>() => {
            // SAFETY: the family says the storage holds a sockaddr_in.
            let a = unsafe { *(&ss as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            Some(SocketAddr::new(
                IpAddr::V4(Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr))),
                u16::from_be(a.sin_port),
            ))
        }
        libc::AF_INET6 if len as usize >= std::mem::size_of::<libc::sockaddr_in6>() => {
            // SAFETY: the family says the storage holds a sockaddr_in6.
            let a = unsafe { *(&ss as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            Some(SocketAddr::new(
                IpAddr::V6(Ipv6Addr::from(a.sin6_addr.s6_addr)),
                u16::from_be(a.sin6_port),
            ))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    #[test]
    fn this_process_sees_its_own_connection() -> TestResult {
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        let c = std::net::TcpStream::connect(l.local_addr()?)?;
        let own = read();
        assert!(own.contains(&c.local_addr()?), "{own:?}");
        assert!(own.contains(&l.local_addr()?), "{own:?}");
        Ok(())
    }

    #[test]
    fn ipv6_tcp_is_read_and_udp_is_not() -> TestResult {
        let u = std::net::UdpSocket::bind("127.0.0.1:0")?;
        let own = read();
        assert!(!own.contains(&u.local_addr()?), "{own:?}");
        // Hosts without IPv6 loopback skip the v6 half.
        if let Ok(l) = std::net::TcpListener::bind("[::1]:0") {
            let c = std::net::TcpStream::connect(l.local_addr()?)?;
            let own = read();
            assert!(own.contains(&c.local_addr()?), "{own:?}");
        }
        Ok(())
    }

    #[test]
    fn other_fds_give_nothing() -> TestResult {
        let f = std::fs::File::open("/proc/self/stat")?;
        assert_eq!(tcp_local(std::os::fd::AsRawFd::as_raw_fd(&f)), None);
        assert_eq!(tcp_local(-1), None);
        Ok(())
    }
}
