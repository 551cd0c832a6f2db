//! The agent's own TCP connections (its datastore watch, API clients), so that tracer never
//! diagnoses itself: a watch is a request answered whenever the datastore next changes, which
//! would read as a slow datastore exchange.
//!
//! Read on the node sync from `/proc/self/fd` (socket inodes) and `/proc/self/net/tcp{,6}` (the
//! agent's network namespace, whose sockets these are). Anything unreadable gives fewer entries,
//! never an error: the set only ever removes the agent's own flows from judgement.
use std::{
    collections::HashSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::PathBuf,
};

/// Local addresses of the agent's own TCP sockets.
pub fn read() -> HashSet<SocketAddr> {
    let inodes = socket_inodes();
    if inodes.is_empty() {
        return HashSet::new();
    }
    ["/proc/self/net/tcp", "/proc/self/net/tcp6"]
        .iter()
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .flat_map(|t| parse(&t, &inodes))
        .collect()
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

fn socket_inodes() -> HashSet<u64> {
    fd_targets()
        .flatten()
        .filter_map(|l| {
            l.to_str()?
                .strip_prefix("socket:[")?
                .strip_suffix(']')?
                .parse()
                .ok()
        })
        .collect()
}

/// Local addresses of the rows of a `/proc/net/tcp{,6}` table whose inode is in `inodes`.
fn parse(table: &str, inodes: &HashSet<u64>) -> Vec<SocketAddr> {
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let cols: Vec<&str> = line.split_whitespace().collect();
            let inode: u64 = cols.get(9)?.parse().ok()?;
            if !inodes.contains(&inode) {
                return None;
            }
            local(cols.get(1)?)
        })
        .collect()
}

/// `0100007F:1F90` (address as the kernel's words in host order, port in hex) as a SocketAddr.
fn local(field: &str) -> Option<SocketAddr> {
    let (addr, port) = field.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let ip = match addr.len() {
        8 => IpAddr::V4(Ipv4Addr::from(
            u32::from_str_radix(addr, 16).ok()?.to_ne_bytes(),
        )),
        32 => {
            let mut b = [0u8; 16];
            for (i, chunk) in b.chunks_mut(4).enumerate() {
                let word = u32::from_str_radix(addr.get(i * 8..i * 8 + 8)?, 16).ok()?;
                chunk.copy_from_slice(&word.to_ne_bytes());
            }
            IpAddr::V6(Ipv6Addr::from(b))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    #[test]
    fn rows_of_our_inodes_give_their_local_addresses() -> TestResult {
        let t = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   \
             0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 111 1 0 100 0 0 10 0\n   \
             1: 0A02000A:C350 0A02000B:094B 01 00000000:00000000 00:00000000 00000000     0        0 222 1 0 20 4 30 10 -1\n";
        let ours: HashSet<u64> = [222].into();
        // Only on a little-endian host is the first word's byte order the one written here.
        if cfg!(target_endian = "little") {
            assert_eq!(
                parse(t, &ours),
                vec!["10.0.2.10:50000".parse::<SocketAddr>()?]
            );
        }
        let v6 = "  sl  local_address remote_address st\n   \
             0: 0000000000000000FFFF00000A00020A:C350 0000000000000000FFFF00000A02000B:094B 01 00000000:00000000 00:00000000 00000000 0 0 7 1\n";
        let got = parse(v6, &[7].into());
        if cfg!(target_endian = "little") {
            assert_eq!(got, vec!["[::ffff:10.2.0.10]:50000".parse::<SocketAddr>()?]);
        }
        Ok(())
    }

    #[test]
    fn this_process_sees_its_own_connection() -> TestResult {
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        let c = std::net::TcpStream::connect(l.local_addr()?)?;
        let own = read();
        assert!(own.contains(&c.local_addr()?), "{own:?}");
        assert!(own.contains(&l.local_addr()?), "{own:?}");
        Ok(())
    }
}
